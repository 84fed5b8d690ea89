"""QUEST page-sparse decode attention as a C++ kernel for the CPU (``quest_attention_cpu.cc``).

Same signature and semantics as :func:`soljax.kernels.quest_attention.quest_decode_attention_reference`,
plus ``layer``: the prefix caches may hold every layer (``[L, B, M, Hkv, Dh]``), read in place at
``layer`` (a traced index), so a loop over layers never copies a layer's slice. The kernel reads
only the pages of the used slots, straight from the cache, and returns the prefix part's
normalized output and log-sum-exp per query head; the suffix keys (at most the horizon T per
schedule) are merged here in JAX. float32 only (the CPU's dtype). Built on first use with the
system's C++ compiler (:mod:`soljax.kernels.native`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from soljax.errors import SoljaxError
from soljax.kernels import native
from soljax.kernels.quest_attention import HIGHEST, check_shapes


@functools.partial(jax.jit, static_argnames=("page_size", "interpret"))
def quest_decode_attention_cpu(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, suffix_mask, pages,
                               num_pages, page_heads, *, page_size: int, layer=None, interpret: bool = False):
    """The CPU kernel (contract: ``soljax.kernels.quest_attention``); ``layer``: index into caches
    of shape ``[L, B, M, Hkv, Dh]`` (None: the caches are one layer's ``[B, M, Hkv, Dh]``).
    ``interpret`` is accepted for signature parity and ignored."""
    del interpret
    if layer is None:
        k_prefix, v_prefix, layer = k_prefix[None], v_prefix[None], 0
    B, K, Hq, Hkv, G, Dh, M, T, NP = check_shapes(q, k_prefix[0], v_prefix[0], prefix_len, k_suffix, v_suffix,
                                                  suffix_mask, pages, num_pages, page_heads, page_size)
    f32, i32 = jnp.float32, jnp.int32
    if jax.default_backend() != "cpu":
        raise SoljaxError(f"the CPU attention kernel runs on the CPU (backend is {jax.default_backend()!r}): use "
                          "impl 'xla' or 'pallas'")
    for name, a in (("q", q), ("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        if a.dtype != f32:
            raise SoljaxError(f"the CPU attention kernel reads float32, got {name} in {a.dtype}")
    target = native.register("quest_attention_cpu.cc", "soljax_quest_decode_attention_cpu")
    out_p, lse_p = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct((B, K, Hq, Dh), f32),
                                             jax.ShapeDtypeStruct((B, K, Hq), f32)))(
        q, k_prefix, v_prefix, jnp.asarray(layer, i32).reshape(1), prefix_len.astype(i32), pages.astype(i32),
        num_pages.astype(i32), page_heads.astype(i32), page_size=page_size)
    # the suffix keys, merged by log-sum-exp with the prefix part
    qg = q.reshape(B, K, Hkv, G, Dh)
    ls = jnp.einsum("bkhgd,bkthd->bkhgt", qg, k_suffix, precision=HIGHEST).reshape(B, K, Hq, T) / math.sqrt(Dh)
    ls = jnp.where(suffix_mask, ls, -jnp.inf)
    top = jnp.maximum(lse_p, ls.max(-1))  # every head attends some key: finite
    w_p = jnp.exp(lse_p - top)  # 0 where the prefix part is empty (lse -inf)
    p_s = jnp.exp(ls - top[..., None])  # [B, K, Hq, T]
    seen = jnp.moveaxis(suffix_mask.reshape(B, K, Hkv, G, T).any(axis=3), 2, 3)[..., None]  # [B, K, T, Hkv, 1]
    v_s = jnp.einsum("bkhgt,bkthd->bkhgd", p_s.reshape(B, K, Hkv, G, T), jnp.where(seen, v_suffix, 0.0),
                     precision=HIGHEST).reshape(B, K, Hq, Dh)  # values no head attends may hold anything
    out = (w_p[..., None] * out_p + v_s) / (w_p + p_s.sum(-1))[..., None]
    return out.astype(q.dtype)
