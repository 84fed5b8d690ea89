"""The SOL policy as a controller: the policy network reads each observation and picks an action."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from soljax import distributions
from soljax.compress.actions import ActionGrid
from soljax.control import network
from soljax.control.budget import check_guard_targets, within_budget, within_running_budget
from soljax.control.given import GridController
from soljax.control.registry import register_controller
from soljax.errors import SoljaxError


@register_controller("policy")
@dataclasses.dataclass(frozen=True)
class PolicyController(GridController):
    """The SOL policy (``ctrl_params`` = its variables): sampled from its tempered logits, or
    greedy. State: the policy's incremental cache over the episode's steps.

    ``guard=True`` makes the targets hard caps: at every step the actions that would leave no way to
    end the episode at or below the targets (:func:`~soljax.control.budget.within_budget`, from the
    usage the engine reports as spent) are removed before the policy chooses, so each episode's
    realized usage (over all its effective steps) never exceeds its target on any axis. That holds
    for episodes that run to their end; a caller that may stop in the middle of an episode (EOS, a
    stop string) needs ``guard_every_step=True`` (see :meth:`open_ended`): then only the actions
    that keep the running mean within the targets are allowed
    (:func:`~soljax.control.budget.within_running_budget`), so the usage of every prefix of the
    effective steps is at or below the targets. Either way the policy still chooses among the
    allowed actions, and each axis's cheapest level is always allowed: a target below it cannot be
    capped (:meth:`check_targets` refuses it)."""

    grid: ActionGrid
    policy: network.PolicyConfig
    greedy: bool = False
    guard: bool = False
    guard_every_step: bool = False

    def __post_init__(self):
        if self.guard_every_step and not self.guard:
            raise SoljaxError("guard_every_step needs guard=True")

    def open_ended(self) -> "PolicyController":
        """This controller for decoding that may stop after any step: a guarded policy keeps its
        caps after every step (``guard_every_step``); unguarded, it is unchanged."""
        return dataclasses.replace(self, guard_every_step=True) if self.guard else self

    def check_targets(self, targets) -> None:
        """With the guard, refuses targets ``[3]`` / ``[B, 3]`` below the grid's cheapest levels
        (:func:`~soljax.control.budget.check_guard_targets`); without it, any target is a request."""
        if self.guard:
            check_guard_targets(self.grid, targets)

    def init(self, ctrl_params, B, K, T):
        return network.init_cache(self.policy, B * K, T)

    def act(self, ctrl_params, state, obs, targets, key):
        B, K = obs.tokens.shape
        flat = lambda a: a.reshape((B * K,) + a.shape[2:])  # noqa: E731
        module = network.SOLPolicy(self.policy, self.grid.num_actions)
        logits, cache = module.apply(ctrl_params, state, flat(obs.h_prev), flat(obs.tok_emb), flat(obs.scalars),
                                     flat(obs.prev_action), jnp.repeat(targets, K, axis=0),
                                     method=network.SOLPolicy.step)
        if self.guard:
            if self.guard_every_step:
                allowed = within_running_budget(self.grid, targets[:, None, :], obs.usage_sum, obs.eff_count)
            else:
                allowed = within_budget(self.grid, targets[:, None, :], obs.usage_sum, obs.eff_count,
                                        obs.steps_left)
            logits = jnp.where(flat(allowed), logits, -1e30)
        actions = distributions.greedy(logits) if self.greedy else distributions.sample(logits, key)
        logp = distributions.log_prob(logits, actions).reshape(B, K)
        actions = actions.reshape(B, K)
        return self.controls(actions), actions, logp, cache
