"""QUEST page-sparse decode attention as a Pallas kernel on Triton (GPU).

Same signature and semantics as :func:`soljax.kernels.quest_attention.quest_decode_attention_reference`
(plus the kernel's tuning knobs). Flash-decoding split: the grid is (block, schedule, KV head, chunk);
each (row, KV head)'s ``num_pages`` used page slots are cut into ``num_splits`` contiguous chunks of
whole loop steps (the last ones short or empty when the count does not divide), and each program
holds the group's G query heads (padded to a power of two, at least 16, for Triton's matmul) and
loops over only its chunk, ``keys_per_step`` keys at a time (gathered page rows of the token-major
``[B, M, Hkv, Dh]`` cache), with an online softmax; the last chunk also folds in the per-schedule
suffix. Each program writes its partial state (unnormalized output, running max, running sum) and a
log-sum-exp merge in plain JAX (:func:`merge_partials`) combines the chunks. Pages that are not
selected are never loaded. Requirements: ``Dh`` and ``page_size`` powers of two, ``Dh >= 16``.

The partial-state buffers are NaN-filled and aliased into the kernel, so an element the kernel fails
to write stays NaN (and the merge propagates it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from soljax.kernels.quest_attention import MASK_VALUE, check_shapes, dot, dot_nt

HIGHEST = jax.lax.Precision.HIGHEST


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def online_softmax_step(carry, s, mask, v):
    """One flash-decoding step: fold logits ``s [G, N]`` (``mask`` = attended) and values ``v [N, Dh]``
    into ``(m [G], l [G], acc [G, Dh])``."""
    m, l, acc = carry
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + dot(p, v)


def _kernel(plen_ref, num_ref, pages_ref, heads_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, smask_ref,
            _o_init, _m_init, _l_init, o_ref, m_ref, l_ref, *, page_size: int, pages_per_step: int,
            capacity: int, num_splits: int, num_slots: int):
    b, k, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    f32 = jnp.float32
    q = q_ref[b, k, h, :, :].astype(f32)  # [Gp, Dh]
    Gp, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)
    plen = plen_ref[b]
    n = num_ref[b, k, h]
    # this program's chunk of the used slots: [start, end), a whole number of loop steps long
    steps_per_chunk = (n + num_splits * pages_per_step - 1) // (num_splits * pages_per_step)
    start = s * steps_per_chunk * pages_per_step
    end = jnp.minimum(n, start + steps_per_chunk * pages_per_step)
    N = pages_per_step * page_size
    j = jnp.arange(N, dtype=jnp.int32)
    g = jnp.arange(Gp, dtype=jnp.int32)[:, None]

    def body(i, carry):
        slot = start + i * pages_per_step + j // page_size  # [N]
        slotc = jnp.minimum(slot, num_slots - 1)
        page = pages_ref[b, k, h, slotc]
        bits = heads_ref[b, k, h, slotc]
        pos = page * page_size + j % page_size
        ok = (slot < end) & (pos >= 0) & (pos < plen)
        posc = jnp.clip(pos, 0, capacity - 1)
        kk = jnp.where(ok[:, None], kp_ref[b, posc, h, :].astype(f32), 0.0)  # [N, Dh]
        vv = jnp.where(ok[:, None], vp_ref[b, posc, h, :].astype(f32), 0.0)
        mask = ok[None, :] & (((bits[None, :] >> g) & 1) == 1)  # [Gp, N]
        return online_softmax_step(carry, dot_nt(q, kk) * scale, mask, vv)

    carry = (jnp.full((Gp,), MASK_VALUE, f32), jnp.zeros((Gp,), f32), jnp.zeros((Gp, Dh), f32))
    nsteps = (jnp.maximum(end - start, 0) + pages_per_step - 1) // pages_per_step
    carry = jax.lax.fori_loop(0, nsteps, body, carry)
    # the per-schedule suffix: folded in by the last chunk only
    ks = ks_ref[b, k, :, h, :].astype(f32)  # [Tp, Dh]
    vs = vs_ref[b, k, :, h, :].astype(f32)
    smask = (smask_ref[b, k, h, :, :] != 0) & (s == num_splits - 1)  # [Gp, Tp]
    vs = jnp.where(jnp.max(smask.astype(jnp.int32), axis=0)[:, None] > 0, vs, 0.0)
    m, l, acc = online_softmax_step(carry, dot_nt(q, ks) * scale, smask, vs)
    o_ref[b, k, h, s, :, :] = acc  # unnormalized
    m_ref[b, k, h, s, :] = m
    l_ref[b, k, h, s, :] = l


def merge_partials(o, m, l):
    """Log-sum-exp merge of per-chunk softmax states over axis -3 / -2.

    ``o [..., S, G, Dh]`` (unnormalized), ``m [..., S, G]`` (running max), ``l [..., S, G]`` (running
    sum) -> ``[..., G, Dh]`` float32. A chunk that attended nothing (``l = 0``, ``m`` = MASK_VALUE or
    -inf) gets weight 0; a head that attended nothing at all comes out 0, never NaN.
    """
    m = jnp.where(l > 0, m, -jnp.inf)
    m_max = jnp.max(m, axis=-2, keepdims=True)  # [..., 1, G]
    m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    w = jnp.where(l > 0, jnp.exp(m - m_max), 0.0)  # [..., S, G]
    num = jnp.sum(w[..., None] * o, axis=-3)  # [..., G, Dh]
    den = jnp.sum(w * l, axis=-2)  # [..., G]
    return num / jnp.where(den > 0, den, 1.0)[..., None]


def default_num_splits(num_slots: int, pages_per_step: int, pages_per_split: int = 32) -> int:
    """Chunks per (row, KV head) for a page capacity: about ``pages_per_split`` pages each (whole
    loop steps), at least one."""
    per = max(pages_per_step, -(-pages_per_split // pages_per_step) * pages_per_step)
    return max(1, -(-num_slots // per))


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "keys_per_step", "num_warps",
                                             "num_splits"))
def quest_decode_attention_gpu(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, suffix_mask, pages,
                               num_pages, page_heads, *, page_size: int, interpret: bool = False,
                               keys_per_step: int = 64, num_warps: int = 4, num_splits: int | None = None):
    """Triton page-sparse decode attention (contract: ``soljax.kernels.quest_attention``).

    ``keys_per_step``: keys loaded per loop step (rounded to whole pages, at least one page).
    ``num_splits``: chunks each (row, KV head)'s used page slots are split into, one program each
    (None: about 32 pages of the capacity per chunk); 1 walks all pages in one program.
    """
    B, K, Hq, Hkv, G, Dh, M, T, NP = check_shapes(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix,
                                                  suffix_mask, pages, num_pages, page_heads, page_size)
    if not (_is_pow2(Dh) and Dh >= 16 and _is_pow2(page_size)):
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim >= 16 and page_size, got "
                         f"head_dim={Dh}, page_size={page_size}")
    Gp, Tp = _pow2_at_least(G), _pow2_at_least(T)
    per_step = max(1, _pow2_at_least(keys_per_step) // page_size)
    S = default_num_splits(NP, per_step) if num_splits is None else num_splits
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ValueError(f"num_splits must be a positive integer, got {num_splits!r}")
    # a chunk is at most ceil(NP / (S * per_step)) steps; the slot lists cover every chunk's steps
    NPp = S * (-(-NP // (S * per_step))) * per_step
    i32, f32 = jnp.int32, jnp.float32
    qp = jnp.pad(q.reshape(B, K, Hkv, G, Dh), ((0, 0),) * 3 + ((0, Gp - G), (0, 0)))  # [B, K, Hkv, Gp, Dh]
    pad_t = ((0, 0), (0, 0), (0, Tp - T), (0, 0), (0, 0))
    ks, vs = jnp.pad(k_suffix, pad_t), jnp.pad(v_suffix, pad_t)  # [B, K, Tp, Hkv, Dh]
    smask = jnp.pad(suffix_mask.reshape(B, K, Hkv, G, T).astype(i32),
                    ((0, 0),) * 3 + ((0, Gp - G), (0, Tp - T)))  # [B, K, Hkv, Gp, Tp]
    pad_p = ((0, 0),) * 3 + ((0, NPp - NP),)
    pg, hd = jnp.pad(pages.astype(i32), pad_p), jnp.pad(page_heads.astype(i32), pad_p)  # [B, K, Hkv, NPp]
    # NaN-filled partial states, aliased into the kernel: an element it fails to write stays NaN
    o_init = jnp.full((B, K, Hkv, S, Gp, Dh), jnp.nan, f32)
    m_init = jnp.full((B, K, Hkv, S, Gp), jnp.nan, f32)
    l_init = jnp.full((B, K, Hkv, S, Gp), jnp.nan, f32)
    kernel = functools.partial(_kernel, page_size=page_size, pages_per_step=per_step, capacity=M,
                               num_splits=S, num_slots=NPp)
    o, m, l = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(o_init.shape, f32), jax.ShapeDtypeStruct(m_init.shape, f32),
                   jax.ShapeDtypeStruct(l_init.shape, f32)),
        grid=(B, K, Hkv, S),
        input_output_aliases={10: 0, 11: 1, 12: 2},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        name="quest_decode_attention",
    )(prefix_len.astype(i32), num_pages.astype(i32), pg, hd, qp, k_prefix, v_prefix, ks, vs, smask,
      o_init, m_init, l_init)
    out = merge_partials(o, m, l)  # [B, K, Hkv, Gp, Dh]
    return out[:, :, :, :G].astype(q.dtype).reshape(B, K, Hq, Dh)
