"""QUEST page-sparse decode attention as a Pallas kernel on Mosaic (TPU).

Same signature and semantics as :func:`soljax.kernels.quest_attention.quest_decode_attention_reference`.
The page table, per-slot head bitmasks, slot counts and prefix lengths are scalar-prefetched into
SMEM (``PrefetchScalarGridSpec``), so the KV block index map reads them: the grid is
``(B, K, Hkv, NP)`` and step ``(b, k, h, i)`` DMAs only page ``pages[b, k, h, i]`` of KV head h
(a ``[page_size, Dh]`` block of the ``[B, M, Hkv * Dh]`` view of the cache, a free reshape). Slots
past ``num_pages`` repeat the last used page's block index, so the pipeline issues no copy for them,
and their compute is skipped. The group's G query heads share each page; the per-schedule suffix
and the normalization run at the last slot. Real TPUs want ``page_size % 8 == 0`` and
``Dh % 128 == 0`` for these blocks; interpret mode (``interpret=True``, TPU semantics on CPU) has no
such limit.

The output buffer is NaN-filled and aliased into the kernel, so an element the kernel fails to write
stays NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from soljax.kernels.quest_attention import MASK_VALUE, check_shapes, dot, dot_nt

HIGHEST = jax.lax.Precision.HIGHEST


def _fold(m_ref, l_ref, acc_ref, s, mask, v):
    """Online-softmax update of the scratch state with logits ``s [G, N]`` and values ``v [N, Dh]``."""
    s = jnp.where(mask, s, MASK_VALUE)
    m = m_ref[...]  # [G, 1]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    m_ref[...] = m_new
    l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * alpha + dot(p, v)


def _kernel(plen_ref, num_ref, pages_ref, heads_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, smask_ref,
            _init_ref, o_ref, m_ref, l_ref, acc_ref, *, page_size: int, num_slots: int, K: int, Hkv: int):
    b, k, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    f32 = jnp.float32
    G, Dh = q_ref.shape
    scale = 1.0 / math.sqrt(Dh)
    row = (b * K + k) * Hkv + h

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, f32)
        l_ref[...] = jnp.zeros(l_ref.shape, f32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    @pl.when(i < num_ref[row])
    def _page():
        page = pages_ref[row * num_slots + i]
        bits = heads_ref[row * num_slots + i]
        pos = page * page_size + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)
        ok = pos < plen_ref[b]  # [ps, 1]; also masks a partial last block's padding
        kk = jnp.where(ok, kp_ref[...].astype(f32), 0.0)  # [ps, Dh]
        vv = jnp.where(ok, vp_ref[...].astype(f32), 0.0)
        g = jax.lax.broadcasted_iota(jnp.int32, (G, page_size), 0)
        mask = (((bits >> g) & 1) == 1) & ok.reshape(1, page_size)
        _fold(m_ref, l_ref, acc_ref, dot_nt(q_ref[...].astype(f32), kk) * scale, mask, vv)

    @pl.when(i == num_slots - 1)
    def _finish():
        smask = smask_ref[...] != 0  # [G, T]
        vs = jnp.where(jnp.max(smask.astype(jnp.int32), axis=0, keepdims=True).reshape(-1, 1) > 0,
                       vs_ref[...].astype(f32), 0.0)
        _fold(m_ref, l_ref, acc_ref, dot_nt(q_ref[...].astype(f32), ks_ref[...].astype(f32)) * scale,
              smask, vs)
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret"))
def quest_decode_attention_tpu(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, suffix_mask, pages,
                               num_pages, page_heads, *, page_size: int, interpret: bool = False):
    """Mosaic page-sparse decode attention (contract: ``soljax.kernels.quest_attention``).

    ``interpret=True`` runs the kernel in Pallas' TPU interpret mode (on any backend).
    """
    B, K, Hq, Hkv, G, Dh, M, T, NP = check_shapes(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix,
                                                  suffix_mask, pages, num_pages, page_heads, page_size)
    i32 = jnp.int32
    num = num_pages.astype(i32).reshape(-1)  # [B*K*Hkv]
    pg = pages.astype(i32).reshape(-1)  # [B*K*Hkv*NP]

    def kv_index(b, k, h, i, plen_ref, num_ref, pages_ref, heads_ref):
        row = (b * K + k) * Hkv + h
        slot = jnp.minimum(i, jnp.maximum(num_ref[row] - 1, 0))  # past the used slots: no new copy
        return b, pages_ref[row * NP + slot], h

    def head_index(b, k, h, i, *_):
        return b, k, h, 0, 0

    def suffix_index(b, k, h, i, *_):
        return b, k, 0, h

    group = pl.BlockSpec((None, None, None, G, Dh), head_index)
    page = pl.BlockSpec((None, page_size, Dh), kv_index)
    suffix = pl.BlockSpec((None, None, T, Dh), suffix_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(B, K, Hkv, NP),
        in_specs=[group, page, page, suffix, suffix, pl.BlockSpec((None, None, None, G, T), head_index),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=group,
        scratch_shapes=[pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
                        pltpu.VMEM((G, Dh), jnp.float32)],
    )
    kernel = functools.partial(_kernel, page_size=page_size, num_slots=NP, K=K, Hkv=Hkv)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, K, Hkv, G, Dh), q.dtype),
        grid_spec=grid_spec,
        input_output_aliases={10: 0},
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        name="quest_decode_attention",
    )(prefix_len.astype(i32), num, pg, page_heads.astype(i32).reshape(-1),
      q.reshape(B, K, Hkv, G, Dh), k_prefix.reshape(B, M, Hkv * Dh), v_prefix.reshape(B, M, Hkv * Dh),
      k_suffix.reshape(B, K, T, Hkv * Dh), v_suffix.reshape(B, K, T, Hkv * Dh),
      suffix_mask.reshape(B, K, Hkv, G, T).astype(i32), jnp.full((B, K, Hkv, G, Dh), jnp.nan, q.dtype))
    return out.reshape(B, K, Hq, Dh)
