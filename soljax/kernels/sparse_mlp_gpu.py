"""Sparse MLP kernels on Triton (GPU): channel-gathered gate/up and a down projection with a fused
fake-quant epilogue. Signatures and semantics: :mod:`soljax.kernels.sparse_mlp`.

- Gate/up: one program per ``block_f`` output columns loops over only the ``num_channels`` used
  channels, ``block_c`` at a time, gathering those rows of ``w_gate``/``w_up`` (rows of a
  ``[D, F]`` matrix are contiguous, so each gathered row segment is one coalesced read).
- Down + fake-quant: one program per ``block_d`` output columns computes its unquantized tile and
  the tile's per-row absmax; the last program to finish (an atomic counter) reads the tile maxima
  and quantizes the ``[R, D]`` output in place. The weights are read once; the epilogue only
  touches the small output.

Rows are padded to a power of two >= 16 (Triton's matmul minimum). Output buffers are NaN-filled
and aliased into the kernels, so an element a kernel fails to write stays NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from soljax.kernels.sparse_mlp import check_down, check_gate_up, quantize_rows

HIGHEST = jax.lax.Precision.HIGHEST


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _pow2_block(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _dot_tn(a, b):
    """``a [k, m].T @ b [k, n]`` in IEEE float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)


def _gate_up_kernel(num_ref, ch_ref, xt_ref, wg_ref, wu_ref, _init_ref, o_ref, *, block_c: int, block_f: int):
    f = pl.program_id(0)
    cols = pl.ds(f * block_f, block_f)
    n = num_ref[0]
    Rp = xt_ref.shape[1]
    j = jnp.arange(block_c, dtype=jnp.int32)

    def body(i, acc):
        g, u = acc
        slot = i * block_c + j
        ch = ch_ref[slot]  # [block_c]
        ok = (slot < n)[:, None]
        xs = jnp.where(ok, xt_ref[ch, :].astype(jnp.float32), 0.0)  # [block_c, Rp]
        wg = jnp.where(ok, wg_ref[ch, cols].astype(jnp.float32), 0.0)  # [block_c, block_f]
        wu = jnp.where(ok, wu_ref[ch, cols].astype(jnp.float32), 0.0)
        return g + _dot_tn(xs, wg), u + _dot_tn(xs, wu)

    zero = jnp.zeros((Rp, block_f), jnp.float32)
    g, u = jax.lax.fori_loop(0, (n + block_c - 1) // block_c, body, (zero, zero))
    g = g.astype(o_ref.dtype).astype(jnp.float32)  # the reference rounds gate/up to x's dtype first
    u = u.astype(o_ref.dtype).astype(jnp.float32)
    o_ref[:, cols] = (g * (1.0 / (1.0 + jnp.exp(-g))) * u).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_c", "block_f", "num_warps"))
def sparse_gate_up_gpu(x, w_gate, w_up, channels, num_channels, *, interpret: bool = False,
                       block_c: int = 32, block_f: int = 128, num_warps: int = 4):
    """Triton channel-gathered ``silu(x @ w_gate) * (x @ w_up)`` (contract: ``soljax.kernels.sparse_mlp``)."""
    R, D, F, C = check_gate_up(x, w_gate, w_up, channels, num_channels)
    Rp = _pow2_at_least(R)
    bf = _pow2_block(F, block_f)
    bc = _pow2_at_least(block_c)
    Cp = -(-C // bc) * bc
    xt = jnp.pad(x, ((0, Rp - R), (0, 0))).T  # [D, Rp]: a gathered channel is one row
    ch = jnp.pad(channels.astype(jnp.int32), (0, Cp - C))
    out = pl.pallas_call(
        functools.partial(_gate_up_kernel, block_c=bc, block_f=bf),
        out_shape=jax.ShapeDtypeStruct((Rp, F), x.dtype),
        grid=(F // bf,),
        input_output_aliases={5: 0},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        name="sparse_gate_up",
    )(jnp.reshape(num_channels.astype(jnp.int32), (1,)), ch, xt, w_gate, w_up,
      jnp.full((Rp, F), jnp.nan, x.dtype))
    return out[:R]


def _down_kernel(bits_ref, a_ref, w_ref, _o_init, _amax_init, _count_init, o_ref, amax_ref, count_ref, *,
                 block_f: int, block_d: int, num_tiles: int, interpret: bool):
    d = pl.program_id(0)
    cols = pl.ds(d * block_d, block_d)
    Rp, F = a_ref.shape

    def body(i, acc):
        rows = pl.ds(i * block_f, block_f)
        return acc + jax.lax.dot_general(a_ref[:, rows].astype(jnp.float32), w_ref[rows, cols].astype(jnp.float32),
                                         (((1,), (0,)), ((), ())), precision=HIGHEST,
                                         preferred_element_type=jnp.float32)

    y = jax.lax.fori_loop(0, F // block_f, body, jnp.zeros((Rp, block_d), jnp.float32))
    y = y.astype(o_ref.dtype)
    o_ref[:, cols] = y
    amax_ref[:, pl.ds(d, 1)] = jnp.max(jnp.abs(y.astype(jnp.float32)), axis=1, keepdims=True)
    if not interpret:  # (interpret mode runs programs one after another)
        plgpu.debug_barrier()  # every thread's stores precede the counter increment
    done = plgpu.atomic_add(count_ref, jnp.zeros((), jnp.int32), jnp.int32(1))

    @pl.when(done == num_tiles - 1)
    def _epilogue():  # the last program: every tile and tile maximum is written
        amax = jnp.max(amax_ref[...], axis=1, keepdims=True)  # [Rp, 1]; never cached by this SM before
        bits = bits_ref[...][:, None]

        def quant(t, carry):
            tile = pl.ds(t * block_d, block_d)
            yt = o_ref[:, tile].astype(jnp.float32)
            o_ref[:, tile] = quantize_rows(yt, amax, bits).astype(o_ref.dtype)
            return carry

        jax.lax.fori_loop(0, num_tiles, quant, 0)


@functools.partial(jax.jit, static_argnames=("interpret", "block_f", "block_d", "num_warps"))
def down_fake_quant_gpu(a, w_down, bits, *, interpret: bool = False, block_f: int = 32, block_d: int = 128,
                        num_warps: int = 4):
    """Triton ``fake_quant(a @ w_down, bits)`` with the quantization fused as the epilogue."""
    R, F, D = check_down(a, w_down, bits)
    Rp = _pow2_at_least(R)
    bf, bd = _pow2_block(F, block_f), _pow2_block(D, block_d)
    tiles = D // bd
    tiles_p = _pow2_at_least(tiles, 1)
    ap = jnp.pad(a, ((0, Rp - R), (0, 0)))
    bp = jnp.pad(bits.astype(jnp.int32), (0, Rp - R), constant_values=16)
    out, _, _ = pl.pallas_call(
        functools.partial(_down_kernel, block_f=bf, block_d=bd, num_tiles=tiles, interpret=bool(interpret)),
        out_shape=(jax.ShapeDtypeStruct((Rp, D), a.dtype), jax.ShapeDtypeStruct((Rp, tiles_p), jnp.float32),
                   jax.ShapeDtypeStruct((1,), jnp.int32)),
        grid=(tiles,),
        input_output_aliases={3: 0, 4: 1, 5: 2},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        name="down_fake_quant",
    )(bp, ap, w_down, jnp.full((Rp, D), jnp.nan, a.dtype), jnp.zeros((Rp, tiles_p), jnp.float32),
      jnp.zeros((1,), jnp.int32))
    return out[:R]
