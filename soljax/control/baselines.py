"""Budget-matched baseline schedules over an action grid: fixed (uniform) and random two-level.

Both work per axis on the two grid levels that bracket the target usage (``lo <= target <= hi``)
and return action ids ``[B, K, T]`` for the ``given_actions`` controller, so baselines run on the
same rollout engine as the policy.

* **fixed**: uniform allocation over time, dithered between the two levels so that after every
  step the running count of high-level steps is ``round(p_hi * steps so far)`` (residual
  correction), with ``p_hi = (target - lo) / (hi - lo)``; each sequence's mean usage is within
  half a grid step divided by T of the target, i.e. within one grid step.
* **random**: per sequence, exactly ``round(p_hi * T)`` high-level steps in a random order, so
  every sequence hits the target up to the rounding to a multiple of ``(hi - lo) / T``.

Rounding is ``floor(x + phase)``: ``phase = 0.5`` (the default) rounds to nearest; per-sequence
phases spread evenly over [0, 1) (:func:`block_phases`) round some sequences up and others down, so
the average over many sequences also matches a target between the ``1 / T`` lattice points.
"""

from __future__ import annotations

import numpy as np

from soljax.compress.actions import ActionGrid
from soljax.control.budget import axis_levels, compose_actions


def bracket(levels: np.ndarray, target: np.ndarray):
    """Per target: indices of the levels just below and above it and the weight of the upper one.

    Targets outside the grid's range clamp to its lowest or highest level; a target within 1e-6
    of a level is that level.
    """
    order = np.argsort(levels, kind="stable")
    vals = levels[order]
    target = np.clip(np.asarray(target, np.float64), vals[0], vals[-1])
    near = np.abs(target[..., None] - vals) < 1e-6  # float32 grid values vs float64 targets
    target = np.where(near.any(-1), vals[near.argmax(-1)], target)
    hi_pos = np.clip(np.searchsorted(vals, target, side="left"), 0, len(vals) - 1)
    lo_pos = np.where(vals[hi_pos] > target, np.maximum(hi_pos - 1, 0), hi_pos)
    lo, hi = vals[lo_pos], vals[hi_pos]
    p_hi = np.where(hi > lo, (target - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return order[lo_pos], order[hi_pos], p_hi


def block_phases(indices) -> np.ndarray:
    """Rounding phases in [0, 1) for sequences ``indices``, evenly spread (golden-ratio sequence)."""
    return np.mod(np.asarray(indices, np.float64) * 0.6180339887498949 + 0.5, 1.0)


def _phase(phase, B: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(0.5 if phase is None else phase, np.float64), (B,))


def fixed_schedule(grid: ActionGrid, targets: np.ndarray, steps: int, schedules: int = 1,
                   phase: np.ndarray | None = None) -> np.ndarray:
    """Action ids ``[B, K, T]`` of the dithered uniform allocation for targets ``[B, 3]``
    (``phase [B]``: rounding phases, see the module doc)."""
    targets = np.asarray(targets, np.float64)
    t = np.arange(1, steps + 1)
    ph = _phase(phase, len(targets))[:, None]
    per_axis = []
    for axis, levels in enumerate(axis_levels(grid)):
        lo, hi, p = bracket(levels, targets[:, axis])
        count = np.floor(p[:, None] * t[None, :] + ph)  # high-level steps after step t, [B, T]
        is_hi = np.diff(np.concatenate([np.zeros((len(p), 1)), count], axis=1), axis=1) > 0
        idx = np.where(is_hi, hi[:, None], lo[:, None])
        per_axis.append(np.broadcast_to(idx[:, None, :], (len(p), schedules, steps)))
    return compose_actions(grid, per_axis).astype(np.int32)


def random_schedule(grid: ActionGrid, targets: np.ndarray, steps: int, schedules: int,
                    rng: np.random.Generator, phase: np.ndarray | None = None) -> np.ndarray:
    """Action ids ``[B, K, T]``: per sequence and axis, exactly ``round(p_hi * T)`` high-level steps
    in a random order (K independent draws per block; ``phase [B]`` as for :func:`fixed_schedule`)."""
    targets = np.asarray(targets, np.float64)
    B = len(targets)
    ph = _phase(phase, B)
    per_axis = []
    for axis, levels in enumerate(axis_levels(grid)):
        lo, hi, p = bracket(levels, targets[:, axis])
        n_hi = np.floor(p * steps + ph).astype(int)
        ranks = rng.random((B, schedules, steps)).argsort(axis=-1).argsort(axis=-1)  # random permutation
        is_hi = ranks < n_hi[:, None, None]
        per_axis.append(np.where(is_hi, hi[:, None, None], lo[:, None, None]))
    return compose_actions(grid, per_axis).astype(np.int32)
