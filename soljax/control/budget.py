"""Budget accounting shared by every controller that works on an action grid: per-action costs,
the levels of each axis, and which actions still let an episode end within its targets.

The spent usage itself is the engine's (``Observation.usage_sum`` / ``eff_count``): controllers
read it from the observation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from soljax.compress.actions import AXES, ActionGrid
from soljax.errors import SoljaxError


def action_costs(grid: ActionGrid) -> jnp.ndarray:
    """``[A, 3]`` nominal usage (token keep, prune keep / rho_max, bits / 16) of every action."""
    return jnp.asarray(np.stack([grid.token_cost, grid.prune_cost, grid.quant_cost], -1), jnp.float32)


def axis_levels(grid: ActionGrid) -> list[np.ndarray]:
    """Usage of each level per axis: token kappa, prune rho / rho_max, quant bits / 16 (ascending
    order of the grid's own enumeration is kept; values are per level index)."""
    P, Q = len(grid.struct_prune_choices), len(grid.quant_choices)
    keep = np.asarray(grid.token_cost[:: P * Q], np.float64)
    prune = np.asarray(grid.prune_cost[: P * Q: Q], np.float64)
    quant = np.asarray(grid.quant_cost[:Q], np.float64)
    return [keep, prune, quant]


def compose_actions(grid: ActionGrid, per_axis):
    """Action ids from per-axis level indices (token, prune, quant), numpy or jax arrays alike."""
    P, Q = len(grid.struct_prune_choices), len(grid.quant_choices)
    return per_axis[0] * (P * Q) + per_axis[1] * Q + per_axis[2]


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


def within_running_budget(grid: ActionGrid, targets, usage_sum, count) -> jnp.ndarray:
    """``[..., A]``: the actions after which the running mean usage stays at or below the targets.

    The prefix form of :func:`within_budget`: an action is allowed when, on every axis,
    ``usage_sum + its usage <= target * (count + 1)`` (no step spends what earlier steps have not
    saved), so the mean over every prefix of the effective steps is within the targets wherever the
    steps stop. Each axis's cheapest level is always allowed (a target below the grid holds the
    mean at the cheapest level).
    """
    return within_budget(grid, targets, usage_sum, count, jnp.ones_like(jnp.asarray(count)))


def check_guard_targets(grid: ActionGrid, targets) -> None:
    """Raises :class:`SoljaxError` if a target ``[3]`` or ``[B, 3]`` (token keep, prune keep, quant
    ratio) lies below its axis's cheapest level on ``grid``: no guard can cap the usage there."""
    floors = np.array([lv.min() for lv in axis_levels(grid)])
    tgt = np.asarray(targets, np.float64).reshape(-1, 3)
    low = [a for a in range(3) if (tgt[:, a] < floors[a] - 1e-6).any()]
    if not low:
        return

    def show(axis: int, v: float) -> str:
        return f"{v:.4g} ({16 * v:.3g} bits)" if AXES[axis] == "quant" else f"{v:.4g}"

    what = "; ".join(f"{AXES[a]} {'ratio' if AXES[a] == 'quant' else 'keep'} {show(a, tgt[:, a].min())} is below "
                     f"the grid's cheapest level {show(a, floors[a])}" for a in low)
    raise SoljaxError(f"the budget guard cannot cap usage below the action grid: {what} (raise the target)")
