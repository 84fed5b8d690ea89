"""Exact "keep everything at least the k-th largest" selection without sorting.

Sorting a few hundred values per row is slow on CPU (and does more work than needed anywhere).
Instead, values are mapped to order-preserving uint32 keys and the k-th largest key is found by
bisection: 32 rounds of counting ``key >= mid`` over the row, all vectorized. The result is the
same threshold a sort would give, so ties at the threshold are kept exactly as with a sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_SIGN = np.uint32(0x80000000)  # a host constant: importing must not start the backend


def sortable_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of float32 ``x`` (``-0.0`` and ``+0.0`` map to the same key)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.uint32)  # -0.0 + 0.0 = +0.0
    return jnp.where(bits & _SIGN, ~bits, bits | _SIGN)


def kth_largest_key(keys: jax.Array, k: jax.Array) -> jax.Array:
    """The k-th largest of ``keys [..., N]`` per row (``k [...]``, 1 <= k <= N), by bisection.

    Returns the largest v with ``count(keys >= v) >= k``, which is the k-th largest key.
    """
    k = jnp.asarray(k, jnp.int32)
    lo = jnp.zeros(keys.shape[:-1], jnp.uint32)
    hi = jnp.full(keys.shape[:-1], 0xFFFFFFFF, jnp.uint32)

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)  # upper middle: the loop always makes progress
        ok = (keys >= mid[..., None]).sum(-1, dtype=jnp.int32) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def top_k_mask(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x >= (k-th largest of x)`` per row of ``x [..., N]`` (ties kept; ``k [...]`` in [1, N])."""
    keys = sortable_keys(x)
    return keys >= kth_largest_key(keys, k)[..., None]
