"""QUEST page-sparse decode attention as a C++ kernel for the CPU (``quest_attention_cpu.cc``).

:func:`quest_decode_attention_cpu` has the signature and semantics of
:func:`soljax.kernels.quest_attention.quest_decode_attention_reference`, plus ``layer``: the
prefix caches may hold every layer (``[L, B, M, Hkv, Dh]``), read in place at ``layer`` (a traced
index), so a loop over layers never copies a layer's slice. The kernel reads only the pages of the
used slots, straight from the cache, and returns the prefix part's normalized output and
log-sum-exp per query head; the suffix keys (at most the horizon T per schedule) are merged here
in JAX. :func:`dense_extend_attention_cpu` serves T new queries of a row that all read every
valid cache entry (a dense extension of a cache, such as the replay of an episode): the kernel
then reads each page once for all T queries. float32 only (the CPU's dtype). Built on first use
with the system's C++ compiler (:mod:`soljax.kernels.native`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from soljax.kernels import native
from soljax.kernels.quest_attention import HIGHEST, check_shapes

EXTEND_PAGE = 32  # keys per online-softmax step of a dense extension (a page's K and V rows stay in L1)


def every_page(lengths_b, capacity: int, num_kv_heads: int, group: int, page_size: int):
    """Page lists ``[B, 1, Hkv, P]`` (shared by a row's queries) that read every valid cache entry
    (``lengths_b [B]`` of ``capacity``) for every query head: ``(pages, num_pages, page_heads)``."""
    B = lengths_b.shape[0]
    P = -(-capacity // page_size)
    pages = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, 1, num_kv_heads, P))
    num = jnp.broadcast_to((-(-lengths_b // page_size)).astype(jnp.int32)[:, None, None], (B, 1, num_kv_heads))
    heads = jnp.full((B, 1, num_kv_heads, P), (1 << group) - 1, jnp.int32)
    return pages, num, heads


def _prefix_part(q, k_prefix, v_prefix, layer, prefix_len, pages, num_pages, page_heads, page_size: int):
    """The kernel: ``(out [B, K, Hq, Dh], lse [B, K, Hq])`` over the listed pages of caches
    ``[L, B, M, Hkv, Dh]`` at ``layer``; lists ``[B, K or 1, Hkv, NP]`` (1: shared by the K queries)."""
    native.check_inputs("CPU attention kernel", "impl 'xla' or 'pallas'", q=q, k_prefix=k_prefix, v_prefix=v_prefix)
    B, K, Hq, Dh = q.shape
    i32 = jnp.int32
    target = native.register("quest_attention_cpu.cc", "soljax_quest_decode_attention_cpu")
    return jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct((B, K, Hq, Dh), jnp.float32),
                                     jax.ShapeDtypeStruct((B, K, Hq), jnp.float32)))(
        q, k_prefix, v_prefix, jnp.asarray(layer, i32).reshape(1), prefix_len.astype(i32), pages.astype(i32),
        num_pages.astype(i32), page_heads.astype(i32), page_size=page_size)


def _merge_suffix(q, out_p, lse_p, k_suffix, v_suffix, suffix_mask):
    """Merges the prefix part with the suffix keys ``[B, K, T, Hkv, Dh]`` (where ``suffix_mask
    [B, K, Hq, T]``) by log-sum-exp -> ``[B, K, Hq, Dh]`` in q's dtype."""
    B, K, Hq, Dh = q.shape
    T, Hkv = k_suffix.shape[2], k_suffix.shape[3]
    G = Hq // Hkv
    qg = q.reshape(B, K, Hkv, G, Dh)
    ls = jnp.einsum("bkhgd,bkthd->bkhgt", qg, k_suffix, precision=HIGHEST).reshape(B, K, Hq, T) / math.sqrt(Dh)
    ls = jnp.where(suffix_mask, ls, -jnp.inf)
    top = jnp.maximum(lse_p, ls.max(-1))
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # a head that attends nothing gets 0, not NaN
    w_p = jnp.exp(lse_p - top)  # 0 where the prefix part is empty (lse -inf)
    p_s = jnp.exp(ls - top[..., None])  # [B, K, Hq, T]
    seen = jnp.moveaxis(suffix_mask.reshape(B, K, Hkv, G, T).any(axis=3), 2, 3)[..., None]  # [B, K, T, Hkv, 1]
    v_s = jnp.einsum("bkhgt,bkthd->bkhgd", p_s.reshape(B, K, Hkv, G, T), jnp.where(seen, v_suffix, 0.0),
                     precision=HIGHEST).reshape(B, K, Hq, Dh)  # values no head attends may hold anything
    den = w_p + p_s.sum(-1)
    out = (w_p[..., None] * out_p + v_s) / jnp.where(den > 0, den, 1.0)[..., None]
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("page_size", "interpret"))
def quest_decode_attention_cpu(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, suffix_mask, pages,
                               num_pages, page_heads, *, page_size: int, layer=None, interpret: bool = False):
    """The CPU kernel (contract: ``soljax.kernels.quest_attention``); ``layer``: index into caches
    of shape ``[L, B, M, Hkv, Dh]`` (None: the caches are one layer's ``[B, M, Hkv, Dh]``).
    ``interpret`` is accepted for signature parity and ignored."""
    del interpret
    if layer is None:
        k_prefix, v_prefix, layer = k_prefix[None], v_prefix[None], 0
    check_shapes(q, k_prefix[0], v_prefix[0], prefix_len, k_suffix, v_suffix, suffix_mask, pages, num_pages,
                 page_heads, page_size)
    out_p, lse_p = _prefix_part(q, k_prefix, v_prefix, layer, prefix_len, pages, num_pages, page_heads, page_size)
    return _merge_suffix(q, out_p, lse_p, k_suffix, v_suffix, suffix_mask)


def dense_extend_attention_cpu(q_bthd, k_cache, v_cache, cache_len, k_new, v_new, new_mask, *, layer=None):
    """Attention of T new queries per row ``q [B, T, Hq, Dh]`` over every valid entry of the row's
    cache (``k``/``v [L, B, M, Hkv, Dh]`` at ``layer``, or one layer's ``[B, M, Hkv, Dh]`` with
    ``layer`` None; positions ``< cache_len [B]``) and over the new keys ``k_new``/``v_new
    [B, T, Hkv, Dh]`` where ``new_mask [B, T, Hq, T]`` (query, head, key) -> ``[B, T, Hq, Dh]``.
    Each cache page is read once for all T queries of a KV head. A query head that attends nothing
    (a padded query of an empty row) gets zeros."""
    if layer is None:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    B, T, Hq, Dh = q_bthd.shape
    _, _, M, Hkv, _ = k_cache.shape
    lists = every_page(cache_len, M, Hkv, Hq // Hkv, EXTEND_PAGE)
    out_p, lse_p = _prefix_part(q_bthd, k_cache, v_cache, layer, cache_len, *lists, EXTEND_PAGE)
    shared = (B, T) + k_new.shape[1:]  # every query reads the same new keys
    return _merge_suffix(q_bthd, out_p, lse_p, jnp.broadcast_to(k_new[:, None], shared),
                         jnp.broadcast_to(v_new[:, None], shared), new_mask)
