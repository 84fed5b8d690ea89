"""Sparse MLP kernels on Mosaic (TPU). Signatures and semantics: :mod:`soljax.kernels.sparse_mlp`.

- Gate/up: the channel list is scalar-prefetched; grid ``(F / block_f, C)``, step ``(f, c)`` DMAs
  row ``channels[c]`` of ``w_gate``/``w_up`` (a ``[1, block_f]`` block of the free ``[D, 1, F]``
  view) and the matching input column, and accumulates the outer product. Slots past
  ``num_channels`` repeat the last used row's block index (no copy) and skip their compute.
- Down + fake-quant: grid over ``block_f`` chunks of F accumulating the ``[R, D]`` product in VMEM;
  the last step quantizes it there and writes it once.

Real TPUs want ``block_f % 128 == 0`` and R a multiple of 8; interpret mode (``interpret=True``)
has no such limit. Output buffers are NaN-filled and aliased into the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from soljax.kernels.sparse_mlp import check_down, check_gate_up, quantize_rows

HIGHEST = jax.lax.Precision.HIGHEST


def _block(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap."""
    return max(b for b in range(1, min(n, cap) + 1) if n % b == 0)


def _gate_up_kernel(num_ref, ch_ref, x_ref, wg_ref, wu_ref, _init_ref, o_ref, g_acc, u_acc):
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _init():
        g_acc[...] = jnp.zeros(g_acc.shape, jnp.float32)
        u_acc[...] = jnp.zeros(u_acc.shape, jnp.float32)

    @pl.when(c < num_ref[0])
    def _channel():
        xc = x_ref[...].astype(jnp.float32).reshape(-1, 1)  # [R, 1]: this channel of every row
        g_acc[...] += xc * wg_ref[...].astype(jnp.float32)  # [R, 1] * [1, block_f]
        u_acc[...] += xc * wu_ref[...].astype(jnp.float32)

    @pl.when(c == pl.num_programs(1) - 1)
    def _finish():
        g = g_acc[...].astype(o_ref.dtype).astype(jnp.float32)
        u = u_acc[...].astype(o_ref.dtype).astype(jnp.float32)
        o_ref[...] = (g * (1.0 / (1.0 + jnp.exp(-g))) * u).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_f"))
def sparse_gate_up_tpu(x, w_gate, w_up, channels, num_channels, *, interpret: bool = False,
                       block_f: int = 512):
    """Mosaic channel-gathered ``silu(x @ w_gate) * (x @ w_up)`` (contract: ``soljax.kernels.sparse_mlp``)."""
    R, D, F, C = check_gate_up(x, w_gate, w_up, channels, num_channels)
    bf = _block(F, block_f)

    def row(f, c, num_ref, ch_ref):
        return ch_ref[jnp.minimum(c, jnp.maximum(num_ref[0] - 1, 0))], 0, f

    def col(f, c, num_ref, ch_ref):
        return ch_ref[jnp.minimum(c, jnp.maximum(num_ref[0] - 1, 0))], 0, 0

    w_spec = pl.BlockSpec((None, 1, bf), row)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(F // bf, C),
        in_specs=[pl.BlockSpec((None, 1, R), col), w_spec, w_spec, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((R, bf), lambda f, c, *_: (0, f)),
        scratch_shapes=[pltpu.VMEM((R, bf), jnp.float32), pltpu.VMEM((R, bf), jnp.float32)])
    return pl.pallas_call(
        _gate_up_kernel,
        out_shape=jax.ShapeDtypeStruct((R, F), x.dtype),
        grid_spec=grid_spec,
        input_output_aliases={5: 0},
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        name="sparse_gate_up",
    )(jnp.reshape(num_channels.astype(jnp.int32), (1,)), channels.astype(jnp.int32), x.T.reshape(D, 1, R),
      w_gate.reshape(D, 1, F), w_up.reshape(D, 1, F), jnp.full((R, F), jnp.nan, x.dtype))


def _down_kernel(bits_ref, a_ref, w_ref, _init_ref, o_ref, acc_ref):
    i = pl.program_id(0)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += jax.lax.dot_general(a_ref[...].astype(jnp.float32), w_ref[...].astype(jnp.float32),
                                        (((1,), (0,)), ((), ())), precision=HIGHEST,
                                        preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(0) - 1)
    def _epilogue():
        y = acc_ref[...].astype(o_ref.dtype).astype(jnp.float32)
        amax = jnp.max(jnp.abs(y), axis=1, keepdims=True)
        o_ref[...] = quantize_rows(y, amax, bits_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_f"))
def down_fake_quant_tpu(a, w_down, bits, *, interpret: bool = False, block_f: int = 512):
    """Mosaic ``fake_quant(a @ w_down, bits)`` with the quantization fused as the epilogue."""
    R, F, D = check_down(a, w_down, bits)
    bf = _block(F, block_f)
    return pl.pallas_call(
        _down_kernel,
        out_shape=jax.ShapeDtypeStruct((R, D), a.dtype),
        grid=(F // bf,),
        in_specs=[pl.BlockSpec((R, 1), lambda i: (0, 0)), pl.BlockSpec((R, bf), lambda i: (0, i)),
                  pl.BlockSpec((bf, D), lambda i: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((R, D), lambda i: (0, 0)),
        scratch_shapes=[pltpu.VMEM((R, D), jnp.float32)],
        input_output_aliases={3: 0},
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        name="down_fake_quant",
    )(bits.astype(jnp.int32).reshape(R, 1), a, w_down, jnp.full((R, D), jnp.nan, a.dtype))
