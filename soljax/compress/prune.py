"""Structured MLP-input pruning: keep the largest-magnitude channels of each vector, zero the rest.

Applied to the MLP input (the post-attention RMSNorm output) of every layer at a controlled decode
step. Each vector along the last axis is pruned on its own: with ``k = clamp(ceil(rho * D), 1, D)``
(the product taken in float32), channels whose magnitude is at least the k-th largest magnitude are
kept (ties at the threshold are all kept, so a row may keep more than k), the others are multiplied
by zero. ``rho = 1`` returns ``x`` unchanged, bit for bit.

The keep count is always computed in float32, whatever the activation dtype (a bfloat16 rho would
round 0.45 to 0.451171875 and keep a few more channels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soljax.compress.select import top_k_mask


def per_vector(v, x: jax.Array, dtype) -> jax.Array:
    """Broadcasts a per-row control to ``x.shape[:-1]``, aligning its axes with x's leading axes.

    ``v`` is a scalar or has a prefix of ``x.shape[:-1]`` as its shape (``[R]`` for ``x [R, T, D]``).
    """
    v = jnp.asarray(v, dtype)
    lead = x.shape[:-1]
    if v.ndim > len(lead) or v.shape != lead[:v.ndim]:
        raise ValueError(f"control of shape {v.shape} does not match the leading axes {lead}")
    return jnp.broadcast_to(v.reshape(v.shape + (1,) * (len(lead) - v.ndim)), lead)


def prune_counts(rho: jax.Array, width: int) -> jax.Array:
    """Channels kept per row: ``clamp(ceil(float32(rho) * width), 1, width)`` as int32."""
    k = jnp.ceil(jnp.asarray(rho, jnp.float32) * jnp.float32(width))
    return jnp.clip(k, 1, width).astype(jnp.int32)


def prune_mask(x: jax.Array, rho: jax.Array) -> jax.Array:
    """Boolean keep mask ``[..., D]`` of :func:`prune_topk` (``rho`` shaped like a prefix of x's rows)."""
    D = x.shape[-1]
    k = prune_counts(per_vector(rho, x, jnp.float32), D)  # x.shape[:-1]
    return top_k_mask(jnp.abs(x), k)


def prune_topk(x: jax.Array, rho: jax.Array) -> jax.Array:
    """Zeroes all but the top-``ceil(rho * D)`` magnitude channels of each vector of ``x [..., D]``.

    ``rho``: keep fraction per row, a scalar or an array whose shape is a prefix of
    ``x.shape[:-1]`` (e.g. ``[R]`` for ``x [R, D]`` or ``[R, 1, D]``). Returns ``x``'s dtype; pruned
    channels become a zero with the channel's sign (-0.0 for a negative one, as ``x * 0`` gives).
    """
    return jnp.where(prune_mask(x, rho), x, jnp.copysign(jnp.zeros_like(x), x))
