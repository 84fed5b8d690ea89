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


@register_controller("policy")
@dataclasses.dataclass(frozen=True)
class PolicyController(_GridController):
    """The SOL policy (``ctrl_params`` = its variables): sampled from its tempered logits, or
    greedy. State: the policy's incremental cache over the episode's steps."""

    grid: ActionGrid
    policy: pol.PolicyConfig
    greedy: bool = False

    def init(self, ctrl_params, B, K, T):
        return pol.init_cache(self.policy, B * K, T)

    def act(self, ctrl_params, state, obs, targets, key):
        B, K = obs.tokens.shape
        flat = lambda a: a.reshape((B * K,) + a.shape[2:])  # noqa: E731
        module = pol.SOLPolicy(self.policy, self.grid.num_actions)
        logits, state = module.apply(ctrl_params, state, flat(obs.h_prev), flat(obs.tok_emb), flat(obs.scalars),
                                     flat(obs.prev_action), jnp.repeat(targets, K, axis=0),
                                     method=pol.SOLPolicy.step)
        actions = pol.greedy(logits) if self.greedy else pol.sample(logits, key)
        logp = pol.log_prob(logits, actions)
        actions = actions.reshape(B, K)
        return self.controls(actions), actions, logp.reshape(B, K), state
