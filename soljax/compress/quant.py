"""Per-token symmetric fake quantization of the MLP output.

For each vector along the last axis and a bit width ``b`` (2 <= b <= 15):
``qmax = 2**(b-1) - 1``, ``s = max(max|x|, 1e-8) / qmax``,
``x_hat = clip(round_half_even(x / s), -qmax, qmax) * s``, all in float32, then cast back to
x's dtype. ``b >= 16`` is the identity (bit for bit), not a 16-bit rounding. Bit widths are per row,
so rows with different widths share one compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soljax.compress.prune import per_vector

SCALE_FLOOR = 1e-8


def quant_step(x: jax.Array, bits: jax.Array) -> jax.Array:
    """The per-vector scale ``s [..., 1]`` (float32) used by :func:`fake_quant` at ``bits < 16``."""
    b = jnp.clip(per_vector(bits, x, jnp.int32), 2, 15)
    qmax = (jnp.left_shift(1, b - 1) - 1).astype(jnp.float32)[..., None]
    amax = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True),
                       jnp.float32(SCALE_FLOOR))
    return amax / qmax


def fake_quant(x: jax.Array, bits: jax.Array) -> jax.Array:
    """Quantize-dequantize ``x [..., D]`` to ``bits`` per vector (symmetric, abs-max scale).

    ``bits``: int per row, a scalar or an array whose shape is a prefix of ``x.shape[:-1]``; values
    >= 16 leave the row untouched, values below 2 are treated as 2.
    """
    b = per_vector(bits, x, jnp.int32)
    qmax = (jnp.left_shift(1, jnp.clip(b, 2, 15) - 1) - 1).astype(jnp.float32)[..., None]
    xf = x.astype(jnp.float32)
    s = quant_step(x, b)
    xq = (jnp.clip(jnp.round(xf / s), -qmax, qmax) * s).astype(x.dtype)
    return jnp.where((b >= 16)[..., None], x, xq)
