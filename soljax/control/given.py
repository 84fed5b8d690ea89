"""Controllers whose choices are given in advance: raw per-step controls, or action ids of a grid
(fixed, random and static baselines, schedule-sampling experiments)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from soljax.compress.actions import ActionGrid
from soljax.control.registry import register_controller
from soljax.lm.controlled import Controls


def deterministic_logp(B: int, K: int) -> jnp.ndarray:
    """The log-probability of a choice made with certainty, ``[B, K]`` zeros."""
    return jnp.zeros((B, K), jnp.float32)


class GridController:
    """Base of the controllers that choose action ids from an :class:`ActionGrid` ``grid``."""

    grid: ActionGrid
    needs_lm_signals = False

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


@register_controller("given_controls")
@dataclasses.dataclass(frozen=True)
class GivenControls:
    """Raw per-step controls supplied as ``ctrl_params = Controls`` of ``[B, K, T]`` arrays."""

    rho_max: float = 1.0
    bos_id: int = -1
    dense_id: int = -1
    needs_lm_signals = False

    def init(self, ctrl_params, B, K, T):
        return ()

    def act(self, ctrl_params: Controls, state, obs, targets, key):
        controls = Controls(*(a[:, :, obs.t] for a in ctrl_params))
        B, K = obs.tokens.shape
        return controls, jnp.full((B, K), -1, jnp.int32), deterministic_logp(B, K), state


def constant_controls(T: int):
    """``ctrl_params`` of :class:`GivenControls` that hold one usage per row: targets ``[B, 3]``
    read as (token keep, MLP-input keep, bits / 16) -> :class:`Controls` of ``[B, 1, T]``."""
    def controls(targets_b3) -> Controls:
        t = np.asarray(targets_b3, np.float32)
        per_step = lambda col, dtype: jnp.asarray(np.broadcast_to(col[:, None, None], (len(t), 1, T)), dtype)
        return Controls(per_step(t[:, 0], jnp.float32), per_step(t[:, 1], jnp.float32),
                        per_step(np.rint(16 * t[:, 2]), jnp.int32))
    return controls


@register_controller("given_actions")
@dataclasses.dataclass(frozen=True)
class GivenActions(GridController):
    """Action ids supplied as ``ctrl_params [B, K, T]`` (vmapped schedule-sampling experiments)."""

    grid: ActionGrid

    def init(self, ctrl_params, B, K, T):
        return ()

    def act(self, ctrl_params, state, obs, targets, key):
        actions = ctrl_params[:, :, obs.t].astype(jnp.int32)
        B, K = actions.shape
        return self.controls(actions), actions, deterministic_logp(B, K), state
