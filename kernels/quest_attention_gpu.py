"""QUEST page-sparse decode attention as a Pallas kernel on Triton (GPU).

Same signature and semantics as :func:`soljax.kernels.quest_attention.quest_decode_attention_reference`.
One program per (block, schedule, KV head) holds the group's G query heads (padded to a power of two,
at least 16, for Triton's matmul) and loops over only the ``num_pages`` used page slots,
``keys_per_step`` keys at a time (gathered page rows of the token-major ``[B, M, Hkv, Dh]`` cache),
with an online softmax; the per-schedule suffix is the last step. Pages that are not selected are
never loaded. Requirements: ``Dh`` and ``page_size`` powers of two, ``Dh >= 16``.

The output buffer is NaN-filled and aliased into the kernel, so an element the kernel fails to write
stays NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from soljax.kernels.quest_attention import MASK_VALUE, check_shapes

HIGHEST = jax.lax.Precision.HIGHEST


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _dot_nt(a, b):
    """``a [m, d] @ b [n, d].T`` in IEEE float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)


def online_softmax_step(carry, s, mask, v):
    """One flash-decoding step: fold logits ``s [G, N]`` (``mask`` = attended) and values ``v [N, Dh]``
    into ``(m [G], l [G], acc [G, Dh])``."""
    m, l, acc = carry
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + _dot(p, v)


def _kernel(plen_ref, num_ref, pages_ref, heads_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, smask_ref,
            _init_ref, o_ref, *, page_size: int, pages_per_step: int, capacity: int):
    b, k, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    f32 = jnp.float32
    q = q_ref[b, k, h, :, :].astype(f32)  # [Gp, Dh]
    Gp, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)
    plen = plen_ref[b]
    n = num_ref[b, k, h]
    N = pages_per_step * page_size
    j = jnp.arange(N, dtype=jnp.int32)
    g = jnp.arange(Gp, dtype=jnp.int32)[:, None]

    def body(i, carry):
        slot = i * pages_per_step + j // page_size  # [N]
        page = pages_ref[b, k, h, slot]
        bits = heads_ref[b, k, h, slot]
        pos = page * page_size + j % page_size
        ok = (slot < n) & (pos >= 0) & (pos < plen)
        posc = jnp.clip(pos, 0, capacity - 1)
        kk = jnp.where(ok[:, None], kp_ref[b, posc, h, :].astype(f32), 0.0)  # [N, Dh]
        vv = jnp.where(ok[:, None], vp_ref[b, posc, h, :].astype(f32), 0.0)
        mask = ok[None, :] & (((bits[None, :] >> g) & 1) == 1)  # [Gp, N]
        return online_softmax_step(carry, _dot_nt(q, kk) * scale, mask, vv)

    carry = (jnp.full((Gp,), MASK_VALUE, f32), jnp.zeros((Gp,), f32), jnp.zeros((Gp, Dh), f32))
    carry = jax.lax.fori_loop(0, (n + pages_per_step - 1) // pages_per_step, body, carry)
    ks = ks_ref[b, k, :, h, :].astype(f32)  # [Tp, Dh]
    vs = vs_ref[b, k, :, h, :].astype(f32)
    smask = smask_ref[b, k, h, :, :] != 0  # [Gp, Tp]
    vs = jnp.where(jnp.max(smask.astype(jnp.int32), axis=0)[:, None] > 0, vs, 0.0)
    m, l, acc = online_softmax_step(carry, _dot_nt(q, ks) * scale, smask, vs)
    o_ref[b, k, h, :, :] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret", "keys_per_step", "num_warps"))
def quest_decode_attention_gpu(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, suffix_mask, pages,
                               num_pages, page_heads, *, page_size: int, interpret: bool = False,
                               keys_per_step: int = 64, num_warps: int = 4):
    """Triton page-sparse decode attention (contract: ``soljax.kernels.quest_attention``).

    ``keys_per_step``: keys loaded per loop step (rounded to whole pages, at least one page).
    """
    B, K, Hq, Hkv, G, Dh, M, T, NP = check_shapes(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix,
                                                  suffix_mask, pages, num_pages, page_heads, page_size)
    if not (_is_pow2(Dh) and Dh >= 16 and _is_pow2(page_size)):
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim >= 16 and page_size, got "
                         f"head_dim={Dh}, page_size={page_size}")
    Gp, Tp = _pow2_at_least(G), _pow2_at_least(T)
    per_step = max(1, _pow2_at_least(keys_per_step) // page_size)
    NPp = -(-NP // per_step) * per_step
    i32 = jnp.int32
    qp = jnp.pad(q.reshape(B, K, Hkv, G, Dh), ((0, 0),) * 3 + ((0, Gp - G), (0, 0)))
    pad_t = ((0, 0), (0, 0), (0, Tp - T), (0, 0), (0, 0))
    ks, vs = jnp.pad(k_suffix, pad_t), jnp.pad(v_suffix, pad_t)
    smask = jnp.pad(suffix_mask.reshape(B, K, Hkv, G, T).astype(i32),
                    ((0, 0),) * 3 + ((0, Gp - G), (0, Tp - T)))
    pad_p = ((0, 0),) * 3 + ((0, NPp - NP),)
    pg, hd = jnp.pad(pages.astype(i32), pad_p), jnp.pad(page_heads.astype(i32), pad_p)
    init = jnp.full((B, K, Hkv, Gp, Dh), jnp.nan, q.dtype)
    kernel = functools.partial(_kernel, page_size=page_size, pages_per_step=per_step, capacity=M)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, K, Hkv, Gp, Dh), q.dtype),
        grid=(B, K, Hkv),
        input_output_aliases={10: 0},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        name="quest_decode_attention",
    )(prefix_len.astype(i32), num_pages.astype(i32), pg, hd, qp, k_prefix, v_prefix, ks, vs, smask, init)
    return out[:, :, :, :G].reshape(B, K, Hq, Dh)
