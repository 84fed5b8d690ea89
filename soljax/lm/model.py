"""The frozen LM as pure functions: full forward, prefill into a KV cache, cached extension, decode.

All functions take the (hashable, static) :class:`LMConfig` first and a parameter pytree second
(see :mod:`soljax.lm.params`). Layers run under ``lax.scan``. Sequences in a batch are right-padded;
per-row lengths say how many entries are real, so rows of different lengths decode together and
each row behaves exactly as if it were alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from soljax.errors import SoljaxError
from soljax.kernels.quest_attention_cpu import dense_extend_attention_cpu
from soljax.lm import layers as L
from soljax.lm.config import LMConfig

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
EXTEND_IMPLS = ("xla", "cpu")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, right-padded to a fixed capacity S.

    ``k``/``v``: ``[L, B, S, Hkv, Dh]`` (post-RoPE keys); ``lengths``: ``[B]`` int32, the number of
    valid positions per row (the next token of row b goes to position ``lengths[b]``).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def empty(cls, cfg: LMConfig, batch: int, capacity: int) -> "KVCache":
        shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    """Input embeddings of token ids (any shape) -> ``[..., D]``."""
    return jnp.take(params["embed"], tokens, axis=0)


def logits(cfg: LMConfig, params: dict, h: jax.Array) -> jax.Array:
    """Vocabulary logits (fp32) from final-norm hidden states ``[..., D]``."""
    if cfg.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)


def _run_layers(cfg: LMConfig, params: dict, tokens_bt, positions_bt, lengths_b, cache, attention_impl: str = "xla"):
    """Runs all layers on new tokens, attending to ``cache`` (if given) and causally to themselves.

    ``lengths_b``: how many of the T new tokens of each row are real. ``attention_impl="cpu"``:
    T > 1 new tokens attend the cache through the C++ kernel, which reads each layer's cache in
    place (:func:`soljax.kernels.quest_attention_cpu.dense_extend_attention_cpu`).

    Returns final-norm hidden states ``[B, T, D]`` and the new keys/values ``[L, B, T, Hkv, Dh]``.
    """
    inv_freq = L.rope_inv_freq(cfg)
    x = embed(params, tokens_bt)
    B, T = tokens_bt.shape
    new_mask = _causal_valid(lengths_b, T)[:, None, None]  # [B, 1, 1, T, T]
    if cache is not None:
        S = cache.capacity
        cache_valid = jnp.arange(S)[None, :] < cache.lengths[:, None]  # [B, S]
        cache_mask = cache_valid[:, None, None, None, :]
        one_new = T == 1  # decoding: each row's one query reads its cache in place
        in_place = attention_impl == "cpu" and not one_new  # the kernel indexes the whole cache by layer
        layer_xs = (params["layers"], *((jnp.arange(cfg.num_layers), None) if in_place else (cache.k, cache.v)))
        if in_place:  # [B, T, Hq, T]: query, head, new key
            new_bthk = jnp.broadcast_to(new_mask[:, 0, 0, :, None, :], (B, T, cfg.num_heads, T))
    else:
        in_place = False
        layer_xs = (params["layers"], None, None)

    def layer(x, xs):
        lp, ck, cv = xs
        h = L.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = L.project_qkv(lp, h, positions_bt, cfg, inv_freq)
        if in_place:  # ck: the layer index into the whole cache
            attn = dense_extend_attention_cpu(q, cache.k, cache.v, cache.lengths, k, v, new_bthk, layer=ck)
        elif ck is None:
            attn = L.causal_self_attention(q, k, v, lengths_b, MASK_VALUE)
        elif one_new:
            attn = L.one_query_attention(q[:, 0], k[:, 0], v[:, 0], ck, cv, cache_valid, lengths_b > 0,
                                          MASK_VALUE)[:, None]
        else:
            scores = jnp.where(new_mask, L.grouped_logits(q, k), MASK_VALUE)
            cached = jnp.where(cache_mask, L.grouped_logits(q, ck), MASK_VALUE)
            probs = jax.nn.softmax(jnp.concatenate([cached, scores], axis=-1), axis=-1)
            S = ck.shape[1]
            attn = L.grouped_values(probs[..., :S], cv) + L.grouped_values(probs[..., S:], v)
        x = x + L.output_proj(lp, attn, cfg)
        x = x + L.mlp(lp, L.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
        return x, (k, v)

    x, (k_new, v_new) = jax.lax.scan(layer, x, layer_xs)
    return L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), k_new, v_new


def _causal_valid(lengths_b: jax.Array, T: int) -> jax.Array:
    """``[B, T, T]`` mask: query t may see new key s iff s <= t and s < length."""
    t = jnp.arange(T)
    return (t[None, :, None] >= t[None, None, :]) & (t[None, None, :] < lengths_b[:, None, None])


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: LMConfig, params: dict, tokens_bt: jax.Array, lengths_b: jax.Array | None = None):
    """Full causal forward of right-padded sequences -> final-norm hidden states ``[B, T, D]``."""
    B, T = tokens_bt.shape
    lengths_b = jnp.full((B,), T, jnp.int32) if lengths_b is None else lengths_b
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    h, _, _ = _run_layers(cfg, params, tokens_bt, positions, lengths_b, None)
    return h


@functools.partial(jax.jit, static_argnums=(0, 4))
def prefill(cfg: LMConfig, params: dict, tokens_bt: jax.Array, lengths_b: jax.Array, capacity: int):
    """Dense prefill of right-padded prompts into a fresh cache of ``capacity`` positions.

    Returns ``(h [B, T, D], cache)``; ``h[b, lengths[b] - 1]`` is each row's last hidden state.
    """
    B, T = tokens_bt.shape
    if capacity < T:
        raise ValueError(f"cache capacity {capacity} is smaller than the prompt length {T}")
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    h, k, v = _run_layers(cfg, params, tokens_bt, positions, lengths_b, None)
    pad = ((0, 0), (0, 0), (0, capacity - T), (0, 0), (0, 0))
    return h, KVCache(k=jnp.pad(k, pad), v=jnp.pad(v, pad), lengths=lengths_b.astype(jnp.int32))


def _write(cache: KVCache, k_new, v_new, positions_bt, valid_bt) -> KVCache:
    """Scatters ``[L, B, T, Hkv, Dh]`` entries at their positions; invalid entries are dropped."""
    B = positions_bt.shape[0]
    pos = jnp.where(valid_bt, positions_bt, cache.capacity)  # out of range -> dropped
    rows = jnp.arange(B)[:, None]
    k = cache.k.at[:, rows, pos].set(k_new, mode="drop")
    v = cache.v.at[:, rows, pos].set(v_new, mode="drop")
    return KVCache(k=k, v=v, lengths=cache.lengths + valid_bt.sum(axis=1, dtype=jnp.int32))


def append(cache: KVCache, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    """Writes T given entries per row, ``k_new``/``v_new [L, B, T, Hkv, Dh]``, at positions
    ``lengths, lengths + 1, ...`` (the caller keeps ``lengths + T <= capacity``)."""
    B, T = k_new.shape[1], k_new.shape[2]
    positions = cache.lengths[:, None] + jnp.arange(T)[None, :]
    return _write(cache, k_new, v_new, positions, jnp.ones((B, T), bool))


@functools.partial(jax.jit, static_argnums=0, static_argnames="attention_impl", donate_argnums=2)
def extend(cfg: LMConfig, params: dict, cache: KVCache, tokens_bt: jax.Array,
           num_new_b: jax.Array | None = None, *, attention_impl: str = "xla"):
    """Appends up to T tokens per row to a cache (row b takes its first ``num_new_b[b]`` tokens).

    Returns ``(h [B, T, D], cache)``. New tokens attend to the row's cached positions and causally
    to each other; positions continue from ``cache.lengths``. The caller must keep
    ``lengths + num_new <= capacity``: entries past the capacity are dropped. ``attention_impl``:
    ``xla``, or ``cpu`` (float32 on the CPU: the C++ kernel reads the cache in place, each page
    once for all T tokens).
    """
    if attention_impl not in EXTEND_IMPLS:
        raise SoljaxError(f"extend's attention_impl must be one of {EXTEND_IMPLS}, got {attention_impl!r}")
    B, T = tokens_bt.shape
    num_new_b = jnp.full((B,), T, jnp.int32) if num_new_b is None else num_new_b
    positions = cache.lengths[:, None] + jnp.arange(T)[None, :]
    h, k, v = _run_layers(cfg, params, tokens_bt, positions, num_new_b, cache, attention_impl)
    valid = jnp.arange(T)[None, :] < num_new_b[:, None]
    return h, _write(cache, k, v, positions, valid)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step(cfg: LMConfig, params: dict, cache: KVCache, tokens_b: jax.Array):
    """One decode step: appends one token per row. Returns ``(logits [B, V] fp32, h [B, D], cache)``."""
    positions = cache.lengths[:, None]
    ones = jnp.ones((tokens_b.shape[0],), jnp.int32)
    h, k, v = _run_layers(cfg, params, tokens_b[:, None], positions, ones, cache)
    return logits(cfg, params, h[:, 0]), h[:, 0], append(cache, k, v)
