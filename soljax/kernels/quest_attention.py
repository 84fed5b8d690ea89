"""QUEST page-sparse decode attention over a shared prefix and per-schedule suffixes.

This module holds the contract shared by every implementation and the pure-JAX reference
(:func:`quest_decode_attention_reference`, which is also the XLA path: it gathers only the selected
pages). The Pallas kernels live beside it: ``quest_attention_gpu`` (Triton) and
``quest_attention_tpu`` (Mosaic, scalar-prefetched page indices); all three share one signature.

Layout (one layer; soljax's shared-prefix + per-schedule-suffix cache):

- ``q [B, K, Hq, Dh]``: one decode query per row (block b, schedule k), post-RoPE.
- ``k_prefix``/``v_prefix [B, M, Hkv, Dh]``: the block's context cache, shared by its K schedules;
  ``prefix_len [B]`` of its M slots are valid. Prefix page p covers positions
  ``[p * page_size, (p + 1) * page_size)``.
- ``k_suffix``/``v_suffix [B, K, T, Hkv, Dh]``: each schedule's own new keys/values.
- ``suffix_mask [B, K, Hq, T]`` (bool): the suffix keys each query head attends (validity included).
- ``pages [B, K, Hkv, NP]`` (int32): the prefix pages read for each (row, KV head); only the first
  ``num_pages [B, K, Hkv]`` slots are used, and they must be distinct pages.
- ``page_heads [B, K, Hkv, NP]`` (int32): bit g set = query head g of the KV head's group (query
  head ``h * G + g``, ``G = Hq // Hkv``) attends the page in that slot. One page list per KV head
  serves the whole group (each KV page is read once for all G heads); the bits keep per-query-head
  QUEST selections exact.

Query head g of KV head h attends prefix position p iff ``p < prefix_len`` and p's page sits in a
used slot with bit g set, and suffix key j iff ``suffix_mask``. Logits are scaled by
``1/sqrt(Dh)``; softmax and accumulation are float32; the output ``[B, K, Hq, Dh]`` has q's dtype.
Every query head must attend at least one key (QUEST always keeps the newest, the current token).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def dot_nt(a, b):
    """``a [m, d] @ b [n, d].T`` in IEEE float32 (for kernel bodies)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)


def dot(a, b):
    """``a [m, d] @ b [d, n]`` in IEEE float32 (for kernel bodies)."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)


MASK_VALUE = float(jnp.finfo(jnp.float32).min)
MAX_GROUP = 31  # query heads per KV head that fit the int32 bitmask


def check_shapes(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, suffix_mask, pages, num_pages,
                 page_heads, page_size: int):
    """Validates the contract's shapes; returns ``(B, K, Hq, Hkv, G, Dh, M, T, NP)``."""
    B, K, Hq, Dh = q.shape
    _, M, Hkv, _ = k_prefix.shape
    T = k_suffix.shape[2]
    NP = pages.shape[-1]
    if Hq % Hkv or Hq // Hkv > MAX_GROUP:
        raise ValueError(f"{Hq} query heads over {Hkv} KV heads: need a group of at most {MAX_GROUP}")
    want = {"k_prefix": (k_prefix, (B, M, Hkv, Dh)), "v_prefix": (v_prefix, (B, M, Hkv, Dh)),
            "prefix_len": (prefix_len, (B,)), "k_suffix": (k_suffix, (B, K, T, Hkv, Dh)),
            "v_suffix": (v_suffix, (B, K, T, Hkv, Dh)), "suffix_mask": (suffix_mask, (B, K, Hq, T)),
            "pages": (pages, (B, K, Hkv, NP)), "num_pages": (num_pages, (B, K, Hkv)),
            "page_heads": (page_heads, (B, K, Hkv, NP))}
    for name, (a, shape) in want.items():
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {shape}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
    return B, K, Hq, Hkv, Hq // Hkv, Dh, M, T, NP


def head_bits(page_heads: jax.Array, G: int) -> jax.Array:
    """``[..., NP]`` bitmasks -> bool ``[..., G, NP]`` (query head g attends the slot)."""
    g = jnp.arange(G, dtype=jnp.int32)[:, None]
    return ((page_heads[..., None, :] >> g) & 1) == 1


@functools.partial(jax.jit, static_argnums=(1, 2))
def pages_from_keep(page_keep: jax.Array, num_kv_heads: int, capacity: int | None = None):
    """Per-query-head page selections -> the per-KV-head page lists of the contract.

    ``page_keep [B, K, Hq, P]`` (bool) -> ``(pages [B, K, Hkv, NP], num_pages [B, K, Hkv],
    page_heads [B, K, Hkv, NP])`` with ``NP = capacity`` (default P): the pages any query head of
    the group keeps, in ascending order, and which heads keep each. Pages beyond ``capacity`` are
    dropped (pass a capacity at least the largest union when exactness matters).
    """
    B, K, Hq, P = page_keep.shape
    G = Hq // num_kv_heads
    NP = P if capacity is None else int(capacity)
    keep = page_keep.reshape(B, K, num_kv_heads, G, P).astype(jnp.int32)
    bits = jnp.sum(keep << jnp.arange(G, dtype=jnp.int32)[:, None], axis=-2)  # [B, K, Hkv, P]
    used = bits != 0
    # kept pages first, then the others, each ascending (what a stable argsort of ~used gives), from
    # prefix sums and one scatter: linear in P, where a sort costs P log P at every decode step
    n_used = used.sum(-1, dtype=jnp.int32)
    kept_slot = jnp.cumsum(used, -1, dtype=jnp.int32) - 1
    other_slot = n_used[..., None] + jnp.cumsum(~used, -1, dtype=jnp.int32) - 1
    slot = jnp.where(used, kept_slot, other_slot)  # [B, K, Hkv, P], a permutation of 0..P-1 per row
    b, k, h = (i[..., None] for i in jnp.indices(slot.shape[:-1], sparse=True))
    pages = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), slot.shape)
    order = jnp.zeros_like(slot).at[b, k, h, slot].set(pages, unique_indices=True)[..., :NP]
    num = jnp.minimum(n_used, NP).astype(jnp.int32)
    if NP > P:
        order = jnp.pad(order, ((0, 0), (0, 0), (0, 0), (0, NP - P)))
    heads = jnp.take_along_axis(bits, jnp.minimum(order, P - 1), axis=-1)
    heads = jnp.where(jnp.arange(NP) < num[..., None], heads, 0)
    return order, num, heads


@functools.partial(jax.jit, static_argnames=("page_size", "interpret"))
def quest_decode_attention_reference(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, suffix_mask,
                                     pages, num_pages, page_heads, *, page_size: int,
                                     interpret: bool = False):
    """Pure-JAX page-sparse decode attention (see the module docstring); reads only the pages in
    the used slots (a gather of ``NP * page_size`` keys per row and KV head). ``interpret`` is
    accepted for signature parity and ignored."""
    del interpret
    B, K, Hq, Hkv, G, Dh, M, T, NP = check_shapes(q, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix,
                                                  suffix_mask, pages, num_pages, page_heads, page_size)
    f32 = jnp.float32
    pos = pages[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)  # [B, K, Hkv, NP, ps]
    used = jnp.arange(NP) < num_pages[..., None]  # [B, K, Hkv, NP]
    valid = used[..., None] & (pos >= 0) & (pos < prefix_len[:, None, None, None, None])
    b = jnp.arange(B)[:, None, None, None, None]
    h = jnp.arange(Hkv)[None, None, :, None, None]
    posc = jnp.clip(pos, 0, M - 1)
    kp = k_prefix[b, posc, h].astype(f32)  # [B, K, Hkv, NP, ps, Dh]
    vp = jnp.where(valid[..., None], v_prefix[b, posc, h].astype(f32), 0.0)  # unread slots add nothing
    qg = q.reshape(B, K, Hkv, G, Dh).astype(f32)
    scale = 1.0 / math.sqrt(Dh)
    lp = jnp.einsum("bkhgd,bkhnsd->bkhgns", qg, kp, precision=HIGHEST) * scale
    mp = head_bits(page_heads, G)[..., None] & valid[:, :, :, None]  # [B, K, Hkv, G, NP, ps]
    ls = jnp.einsum("bkhgd,bkthd->bkhgt", qg, k_suffix.astype(f32), precision=HIGHEST) * scale
    ms = suffix_mask.reshape(B, K, Hkv, G, T)
    seen = jnp.moveaxis(ms.any(axis=3), 2, 3)[..., None]  # [B, K, T, Hkv, 1]: some head attends
    vs = jnp.where(seen, v_suffix.astype(f32), 0.0)
    S = NP * page_size
    logits = jnp.concatenate([jnp.where(mp, lp, MASK_VALUE).reshape(B, K, Hkv, G, S),
                              jnp.where(ms, ls, MASK_VALUE)], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    out = (jnp.einsum("bkhgs,bkhsd->bkhgd", probs[..., :S], vp.reshape(B, K, Hkv, S, Dh), precision=HIGHEST)
           + jnp.einsum("bkhgt,bkthd->bkhgd", probs[..., S:], vs, precision=HIGHEST))
    return out.reshape(B, K, Hq, Dh).astype(q.dtype)
