"""Sparse SwiGLU MLP for small-batch decode: the contract and the pure-JAX references.

soljax prunes each MLP input vector to its largest-magnitude channels (``rho``) and fake-quantizes
each MLP output vector (``bits``). Two ops turn that into saved work:

- :func:`sparse_gate_up_reference` (TEAL-style): ``x [R, D]`` is the pruned MLP input (channels a
  row does not keep are zero); ``channels [C]`` (int32) lists the channels any row keeps, distinct,
  of which the first ``num_channels`` (int32 scalar) are used. Only those rows of ``w_gate``/``w_up
  [D, F]`` are read: ``a = silu(x[:, ch] @ w_gate[ch]) * (x[:, ch] @ w_up[ch])``, ``[R, F]``, which
  equals the dense ``silu(x @ w_gate) * (x @ w_up)``. At batch 1 the channels are the row's own; for
  small batches they are the union over rows (:func:`union_channels`).
- :func:`down_fake_quant_reference`: ``fake_quant(a @ w_down, bits)`` per row, ``a [R, F]``,
  ``w_down [F, D]``, ``bits [R]`` (int, >= 16 = untouched), with the quantization as the epilogue of
  the matmul (the kernels never write the unquantized output as a separate pass).

Accumulation is float32; outputs have x's (a's) dtype. The references gather the used weight rows
(a real saving under XLA when the channel capacity ``C`` is smaller than D); the Pallas kernels
(``sparse_mlp_gpu``: Triton, ``sparse_mlp_tpu``: Mosaic) share the signatures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from soljax.compress.quant import fake_quant

HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnums=1)
def union_channels(keep: jax.Array, capacity: int | None = None):
    """``keep [R, D]`` (bool) -> ``(channels [C], num_channels [])``: the channels any row keeps,
    ascending, padded with unused entries to ``C = capacity`` (default D)."""
    D = keep.shape[-1]
    C = D if capacity is None else int(capacity)
    used = keep.any(axis=0)
    order = jnp.argsort(~used, stable=True)[:C].astype(jnp.int32)
    if C > D:
        order = jnp.pad(order, (0, C - D))
    return order, jnp.minimum(used.sum(), C).astype(jnp.int32)


def check_gate_up(x, w_gate, w_up, channels, num_channels):
    R, D = x.shape
    F = w_gate.shape[1]
    for name, a, shape in (("w_gate", w_gate, (D, F)), ("w_up", w_up, (D, F)),
                           ("channels", channels, channels.shape[:1]), ("num_channels", num_channels, ())):
        if tuple(a.shape) != shape or (name == "channels" and a.ndim != 1):
            raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {shape}")
    return R, D, F, channels.shape[0]


@functools.partial(jax.jit, static_argnames="interpret")
def sparse_gate_up_reference(x, w_gate, w_up, channels, num_channels, *, interpret: bool = False):
    """``silu(x[:, ch] @ w_gate[ch]) * (x[:, ch] @ w_up[ch])`` over the used channels (see module)."""
    del interpret
    check_gate_up(x, w_gate, w_up, channels, num_channels)
    used = jnp.arange(channels.shape[0]) < num_channels
    ch = jnp.where(used, channels, channels[0])  # unused slots re-read a used row, with zero input
    xs = jnp.where(used[None, :], x[:, ch], 0).astype(jnp.float32)  # [R, C]
    g = jnp.dot(xs, w_gate[ch].astype(jnp.float32), precision=HIGHEST).astype(x.dtype)  # [R, F]
    u = jnp.dot(xs, w_up[ch].astype(jnp.float32), precision=HIGHEST).astype(x.dtype)
    return jax.nn.silu(g) * u


def check_down(a, w_down, bits):
    R, F = a.shape
    if w_down.shape[0] != F or w_down.ndim != 2:
        raise ValueError(f"w_down has shape {tuple(w_down.shape)}, expected ({F}, D)")
    if tuple(bits.shape) != (R,):
        raise ValueError(f"bits has shape {tuple(bits.shape)}, expected ({R},)")
    return R, F, w_down.shape[1]


@functools.partial(jax.jit, static_argnames="interpret")
def down_fake_quant_reference(a, w_down, bits, *, interpret: bool = False):
    """``fake_quant(a @ w_down, bits)`` per row, ``[R, D]`` in a's dtype."""
    del interpret
    check_down(a, w_down, bits)
    y = jnp.dot(a.astype(jnp.float32), w_down.astype(jnp.float32), precision=HIGHEST).astype(a.dtype)
    return fake_quant(y, bits)


def round_half_even(y: jax.Array) -> jax.Array:
    """Round-to-nearest-even of float32 ``y`` from floor and exact differences (for kernel backends
    without a rounding primitive); equals ``jnp.round``."""
    r = jnp.floor(y)
    d = y - r  # exact: in [0, 1)
    odd = (r - 2.0 * jnp.floor(r * 0.5)) == 1.0
    return jnp.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


def quantize_rows(y: jax.Array, amax: jax.Array, bits: jax.Array) -> jax.Array:
    """Kernel epilogue: fake-quantize float32 ``y [R, N]`` given each row's ``amax [R, 1]`` and
    ``bits [R, 1]`` (int32), exactly as :func:`soljax.compress.quant.fake_quant`."""
    b = jnp.clip(bits, 2, 15)
    qmax = ((jnp.left_shift(1, b - 1)) - 1).astype(jnp.float32)
    s = jnp.maximum(amax, 1e-8) / qmax
    q = jnp.minimum(jnp.maximum(round_half_even(y / s), -qmax), qmax) * s
    return jnp.where(bits >= 16, y, q)
