"""Budget accounting shared by every controller that works on an action grid: per-action costs,
the levels of each axis, and which actions still let an episode end within its targets.

The spent usage itself is the engine's (``Observation.usage_sum`` / ``eff_count``): controllers
read it from the observation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from soljax.compress.actions import ActionGrid


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
