"""The SOL policy as a controller: the policy network reads each observation and picks an action."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from soljax import distributions
from soljax.compress.actions import ActionGrid
from soljax.control import network
from soljax.control.budget import within_budget
from soljax.control.given import GridController
from soljax.control.registry import register_controller


@register_controller("policy")
@dataclasses.dataclass(frozen=True)
class PolicyController(GridController):
    """The SOL policy (``ctrl_params`` = its variables): sampled from its tempered logits, or
    greedy. State: the policy's incremental cache over the episode's steps.

    ``guard=True`` makes the targets hard caps: at every step the actions that would leave no way to
    end the episode at or below the targets (:func:`~soljax.control.budget.within_budget`, from the
    usage the engine reports as spent) are removed before the policy chooses, so the realized usage
    of each axis never exceeds its target (or the axis's cheapest level)."""

    grid: ActionGrid
    policy: network.PolicyConfig
    greedy: bool = False
    guard: bool = False

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
            allowed = within_budget(self.grid, targets[:, None, :], obs.usage_sum, obs.eff_count, obs.steps_left)
            logits = jnp.where(flat(allowed), logits, -1e30)
        actions = distributions.greedy(logits) if self.greedy else distributions.sample(logits, key)
        logp = distributions.log_prob(logits, actions).reshape(B, K)
        actions = actions.reshape(B, K)
        return self.controls(actions), actions, logp, cache
