"""Controllers: who chooses each step's compute in the rollout engine, registered by name.

A controller is a hashable (static) object; its arrays travel separately as ``ctrl_params`` so one
compiled rollout serves any values. Interface::

    bos_id, dense_id, rho_max                          # attributes
    init(ctrl_params, B, K, T) -> state                # pytree carried through the scan
    act(ctrl_params, state, obs, targets, key) -> (controls, actions [B, K], logp [B, K], state)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax.numpy as jnp
import numpy as np

from soljax.compress.actions import ActionGrid
from soljax.errors import SoljaxError
from soljax import policy as pol
from soljax.lm.controlled import Controls

CONTROLLERS: dict[str, Callable] = {}


def register_controller(name: str):
    def wrap(cls):
        CONTROLLERS[name] = cls
        return cls

    return wrap


def make_controller(name: str, **kwargs):
    """Builds a registered controller by name."""
    importlib.import_module("soljax.heuristics")  # registers "emc" and "dac"
    if name not in CONTROLLERS:
        raise SoljaxError(f"unknown controller {name!r} (known: {', '.join(sorted(CONTROLLERS))})")
    return CONTROLLERS[name](**kwargs)


def _deterministic(B: int, K: int):
    return jnp.zeros((B, K), jnp.float32)


@register_controller("given_controls")
@dataclasses.dataclass(frozen=True)
class GivenControls:
    """Raw per-step controls supplied as ``ctrl_params = Controls`` of ``[B, K, T]`` arrays."""

    rho_max: float = 1.0
    bos_id: int = -1
    dense_id: int = -1

    def init(self, ctrl_params, B, K, T):
        return ()

    def act(self, ctrl_params: Controls, state, obs, targets, key):
        t = obs.t
        controls = Controls(*(a[:, :, t] for a in ctrl_params))
        B, K = obs.tokens.shape
        return controls, jnp.full((B, K), -1, jnp.int32), _deterministic(B, K), state


class _GridController:
    """Shared attributes of controllers that choose action ids from an :class:`ActionGrid`."""

    grid: ActionGrid

    @property
    def bos_id(self) -> int:
        return self.grid.bos_id

    @property
    def dense_id(self) -> int:
        return self.grid.dense_idx

    @property
    def rho_max(self) -> float:
        return self.grid.rho_max

    def controls(self, actions) -> Controls:
        return Controls(*self.grid.controls(actions))


@register_controller("given_actions")
@dataclasses.dataclass(frozen=True)
class GivenActions(_GridController):
    """Action ids supplied as ``ctrl_params [B, K, T]`` (vmapped schedule-sampling experiments)."""

    grid: ActionGrid

    def init(self, ctrl_params, B, K, T):
        return ()

    def act(self, ctrl_params, state, obs, targets, key):
        actions = ctrl_params[:, :, obs.t].astype(jnp.int32)
        B, K = actions.shape
        return self.controls(actions), actions, _deterministic(B, K), state


def action_costs(grid: ActionGrid) -> jnp.ndarray:
    """``[A, 3]`` nominal usage (token keep, prune keep / rho_max, bits / 16) of every action."""
    return jnp.asarray(np.stack([grid.token_cost, grid.prune_cost, grid.quant_cost], -1), jnp.float32)


def budget_state(B: int, K: int) -> dict:
    """Usage spent so far per row: ``sum [B, K, 3]`` over the effective steps, and their ``count``."""
    return dict(sum=jnp.zeros((B, K, 3), jnp.float32), count=jnp.zeros((B, K), jnp.float32))


def spend(grid: ActionGrid, state: dict, actions, obs) -> dict:
    """``state`` (see :func:`budget_state`) after this step's ``actions [B, K]`` (effective steps count)."""
    eff = (obs.scalars[..., 1] > 0.5).astype(jnp.float32)
    return dict(state, sum=state["sum"] + action_costs(grid)[actions] * eff[..., None], count=state["count"] + eff)


def within_budget(grid: ActionGrid, targets, usage_sum, count, remaining) -> jnp.ndarray:
    """``[..., A]``: the actions after which the episode can still end at or below its targets.

    ``targets [..., 3]``, ``usage_sum [..., 3]``, ``count [...]`` (effective steps so far) and
    ``remaining [...]`` (effective steps left, this one included) per row. An action is allowed when,
    on every axis, its usage plus the cheapest level for the other remaining steps stays within
    ``target * (count + remaining)``; each axis's cheapest level is always allowed, so a row never
    runs out of actions (and a target below the grid ends at the cheapest level).
    """
    costs = action_costs(grid)
    lowest = costs.min(0)
    R = jnp.maximum(jnp.asarray(remaining), 1).astype(jnp.float32)[..., None]
    cap = targets * (count[..., None] + R) - usage_sum - (R - 1) * lowest  # [..., 3]
    cap = jnp.maximum(cap, lowest) + 1e-6
    return jnp.all(costs <= cap[..., None, :], axis=-1)


@register_controller("policy")
@dataclasses.dataclass(frozen=True)
class PolicyController(_GridController):
    """The SOL policy (``ctrl_params`` = its variables): sampled from its tempered logits, or
    greedy. State: the policy's incremental cache over the episode's steps.

    ``guard=True`` makes the targets hard caps: at every step the actions that would leave no way to
    end the episode at or below the targets (:func:`within_budget`) are removed before the policy
    chooses, so the realized usage of each axis never exceeds its target (or the axis's cheapest
    level). The state then also carries the usage spent so far."""

    grid: ActionGrid
    policy: pol.PolicyConfig
    greedy: bool = False
    guard: bool = False

    def init(self, ctrl_params, B, K, T):
        cache = pol.init_cache(self.policy, B * K, T)
        if not self.guard:
            return cache
        return dict(budget_state(B, K), cache=cache)

    def act(self, ctrl_params, state, obs, targets, key):
        B, K = obs.tokens.shape
        flat = lambda a: a.reshape((B * K,) + a.shape[2:])  # noqa: E731
        module = pol.SOLPolicy(self.policy, self.grid.num_actions)
        logits, cache = module.apply(ctrl_params, state["cache"] if self.guard else state, flat(obs.h_prev),
                                     flat(obs.tok_emb), flat(obs.scalars), flat(obs.prev_action),
                                     jnp.repeat(targets, K, axis=0), method=pol.SOLPolicy.step)
        if self.guard:
            allowed = within_budget(self.grid, targets[:, None, :], state["sum"], state["count"], obs.steps_left)
            logits = jnp.where(flat(allowed), logits, -1e30)
        actions = pol.greedy(logits) if self.greedy else pol.sample(logits, key)
        logp = pol.log_prob(logits, actions).reshape(B, K)
        actions = actions.reshape(B, K)
        if not self.guard:
            return self.controls(actions), actions, logp, cache
        return self.controls(actions), actions, logp, spend(self.grid, dict(state, cache=cache), actions, obs)
