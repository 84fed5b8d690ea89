"""The decode step with per-row compute controls, over a shared prefix and per-schedule suffixes.

A block's M-token context is prefilled once (:func:`prefill_shared`): its KV cache and, for QUEST,
its per-page key max/min live once per block (:class:`SharedPrefix`, ``[L, B, M, ...]``). K
schedules then decode the same block side by side; only their own T new entries are stored per
schedule (:class:`SuffixCache`, ``[L, B, K, T, ...]``), so per-schedule memory grows with T, never
with the context. :func:`controlled_step` appends one token to every ``(block, schedule)`` row
with per-row controls ``kappa`` (token keep fraction), ``rho`` (MLP-input channel keep fraction)
and ``bits`` (MLP-output bits), applied identically in every layer:

* attention reads only the keys the sparsity criterion keeps (QUEST by default);
* the MLP input keeps its top ``ceil(rho * D)`` channels by magnitude;
* the MLP output is fake-quantized per token to ``bits`` (16 = untouched).

Steps with ``kv_len <= Ts + Tw + 1`` are not *effective*: they run dense whatever the controls.
With dense controls (kappa = 1, rho = 1, bits = 16) the step computes exactly what it computes
with ``controls=None``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from soljax.compress import attention as sparse
from soljax.compress.prune import prune_topk
from soljax.compress.quant import fake_quant
from soljax.errors import SoljaxError
from soljax.kernels import ops
from soljax.kernels.swiglu_cpu import swiglu_cpu
from soljax.lm import kernel_path
from soljax.lm import layers as L
from soljax.lm import model as lm
from soljax.lm.config import LMConfig

CRITERIA = ("quest", "recency", "relevancy")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """How token sparsity is applied: ``criterion`` (quest | recency | relevancy), QUEST
    ``page_size``, ``sink_tokens`` (Ts) and ``window_tokens`` (Tw) for recency/relevancy and the
    effective-step rule, and the relevancy ``relevancy_tier`` (per_head | per_layer).

    ``attention_impl`` / ``mlp_impl`` (xla | pallas | cpu) choose how the decode step runs attention
    and the MLP: ``xla`` is the masked reference path; ``pallas`` runs the kernels of
    :mod:`soljax.kernels` (page-sparse attention, needs QUEST; channel-gathered MLP with the
    fake-quant epilogue), which read only the kept pages and weight rows; ``cpu`` runs the C++
    kernels (page-sparse attention, needs QUEST; the MLP reading only the kept input channels' weight
    rows, then the fake quantizer). ``kernel_interpret`` runs the Pallas kernels interpreted (the
    only way on CPU)."""

    criterion: str = "quest"
    page_size: int = 8
    sink_tokens: int = 4
    window_tokens: int = 2
    relevancy_tier: str = "per_head"
    attention_impl: str = "xla"
    mlp_impl: str = "xla"
    kernel_interpret: bool = False

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise SoljaxError(f"unknown sparsity criterion {self.criterion!r} (expected one of {CRITERIA})")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise SoljaxError(f"page_size must be a positive integer, got {self.page_size!r}")
        for name in ("sink_tokens", "window_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SoljaxError(f"{name} must be a non-negative integer, got {v!r}")
        if self.relevancy_tier not in ("per_head", "per_layer"):
            raise SoljaxError(f"relevancy_tier must be per_head or per_layer, got {self.relevancy_tier!r}")
        ops.check_impl("attention_impl", self.attention_impl, ops.ATTENTION_IMPLS)
        ops.check_impl("mlp_impl", self.mlp_impl, ops.MLP_IMPLS)
        if self.attention_impl != "xla" and self.criterion != "quest":
            raise SoljaxError(f"attention_impl {self.attention_impl!r} reads whole QUEST pages: it needs criterion "
                              f"'quest', got {self.criterion!r}")
        if not isinstance(self.kernel_interpret, bool):
            raise SoljaxError(f"kernel_interpret must be true or false, got {self.kernel_interpret!r}")

    @property
    def min_effective_kv(self) -> int:
        """A step is effective (compressible) iff ``kv_len`` exceeds this."""
        return self.sink_tokens + self.window_tokens + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedPrefix:
    """One copy per block: keys/values ``[L, B, M, Hkv, Dh]``, ``lengths [B]`` and, for QUEST,
    page summaries ``kmax``/``kmin [L, B, P, Hkv, Dh]`` with ``page_valid [B, P]``."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    kmax: jax.Array | None = None
    kmin: jax.Array | None = None
    page_valid: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SuffixCache:
    """Per-schedule entries ``[L, B, K, T, Hkv, Dh]``; ``length`` (scalar) entries are written."""

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, cfg: LMConfig, batch: int, schedules: int, steps: int) -> "SuffixCache":
        shape = (cfg.num_layers, batch, schedules, steps, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((), jnp.int32))


class Controls(NamedTuple):
    """Per-row controls ``[B, K]``: token keep fraction, MLP-input keep fraction, MLP-output bits."""

    kappa: jax.Array
    rho: jax.Array
    bits: jax.Array


class StepInfo(NamedTuple):
    """What a controlled step did, per row ``[B, K]``."""

    effective: jax.Array  # bool: the controls were applied (else the step ran dense)
    attended: jax.Array  # realized attended fraction of the kv_len keys, mean over layers and heads
    kept_keys: jax.Array  # [B, K, L, Hq] int32: keys each query head of each layer attended to


def page_summaries_of(scfg: SparsityConfig, cache: lm.KVCache):
    """QUEST page summaries ``(kmax, kmin) [L, B, P, Hkv, Dh]`` of a dense cache's valid keys (None
    for the other criteria, which need none)."""
    if scfg.criterion != "quest":
        return None
    Lyr, B, M, Hkv, Dh = cache.k.shape
    lengths = jnp.broadcast_to(cache.lengths[None], (Lyr, B)).reshape(Lyr * B)
    kmax, kmin, _ = sparse.page_summaries(cache.k.reshape(Lyr * B, M, Hkv, Dh), lengths, scfg.page_size)
    return kmax.reshape(Lyr, B, *kmax.shape[1:]), kmin.reshape(Lyr, B, *kmin.shape[1:])


def refresh_page_summaries_of(scfg: SparsityConfig, summaries, cache: lm.KVCache, first_b: jax.Array, count: int):
    """:func:`page_summaries_of` ``cache`` after its rows took keys at positions ``[first_b, first_b +
    count)``, from ``summaries`` of the keys before (see
    :func:`soljax.compress.attention.refresh_page_summaries`: the work is in ``count``, not in the
    capacity)."""
    if summaries is None:
        return None
    Lyr, B, M, Hkv, Dh = cache.k.shape
    rows = lambda a: jnp.broadcast_to(a[None], (Lyr, B)).reshape(Lyr * B)  # noqa: E731
    flat = lambda a: a.reshape(Lyr * B, *a.shape[2:])  # noqa: E731
    kmax, kmin = sparse.refresh_page_summaries(*map(flat, summaries), flat(cache.k), rows(first_b),
                                               rows(cache.lengths), count, scfg.page_size)
    return kmax.reshape(summaries[0].shape), kmin.reshape(summaries[1].shape)


def shared_prefix_from_cache(scfg: SparsityConfig, cache: lm.KVCache, summaries=None) -> SharedPrefix:
    """Wraps a dense cache as a shared prefix with, for QUEST, its page summaries (``summaries``
    when given: :func:`page_summaries_of` the cache, kept up to date by the caller)."""
    if scfg.criterion != "quest":
        return SharedPrefix(k=cache.k, v=cache.v, lengths=cache.lengths)
    kmax, kmin = page_summaries_of(scfg, cache) if summaries is None else summaries
    P = kmax.shape[2]
    page_valid = jnp.arange(P)[None, :] * scfg.page_size < cache.lengths[:, None]  # a page with a valid key
    return SharedPrefix(k=cache.k, v=cache.v, lengths=cache.lengths, kmax=kmax, kmin=kmin, page_valid=page_valid)


@functools.partial(jax.jit, static_argnums=(0, 1))
def prefill_shared(cfg: LMConfig, scfg: SparsityConfig, params: dict, tokens_bm: jax.Array,
                   lengths_b: jax.Array):
    """Dense prefill of B contexts -> ``(h_last [B, D], SharedPrefix)``; ``h_last`` is the
    final-norm hidden state at each context's last position."""
    B, M = tokens_bm.shape
    h, cache = lm.prefill(cfg, params, tokens_bm, lengths_b, M)
    return h[jnp.arange(B), lengths_b - 1], shared_prefix_from_cache(scfg, cache)


def _keep_masks(scfg: SparsityConfig, q, logits_p, logits_s, prefix_lp, k_suffix, prefix_len, t, kappa,
                capacity: int):
    """Keep masks ``[B, K, Hq, M]`` and ``[B, K, Hq, T]`` of the configured criterion."""
    B, K, Hq, _ = q.shape
    T = k_suffix.shape[2]
    R = B * K
    suffix_len = t + 1
    if scfg.criterion == "quest":
        return sparse.quest_keep_shared(q, prefix_lp, prefix_len, k_suffix, suffix_len, kappa,
                                        scfg.page_size, capacity)
    pos_p = jnp.broadcast_to(jnp.arange(capacity)[None, :], (R, capacity))
    pos_p = jnp.where(pos_p < jnp.repeat(prefix_len, K)[:, None], pos_p, -1)  # -1: padding slot
    j = jnp.arange(T)[None, :]
    pos_s = jnp.where(j < suffix_len, jnp.repeat(prefix_len, K)[:, None] + j, -1)
    pos_s = jnp.broadcast_to(pos_s, (R, T))
    kv_len = jnp.repeat(prefix_len, K) + suffix_len
    positions = jnp.concatenate([pos_p, pos_s], axis=1)
    if scfg.criterion == "recency":
        keep = sparse.recency_keep_at(positions, kv_len, kappa.reshape(R), scfg.sink_tokens,
                                      scfg.window_tokens)[:, None, :]
        keep = jnp.broadcast_to(keep, (R, Hq, capacity + T))
    else:
        logits = jnp.concatenate([logits_p, logits_s], axis=-1).reshape(R, Hq, capacity + T)
        keep = sparse.relevancy_keep_logits(logits, positions, kv_len, kappa.reshape(R),
                                            scfg.sink_tokens, scfg.window_tokens, scfg.relevancy_tier)
    keep = keep.reshape(B, K, Hq, capacity + T)
    return keep[..., :capacity], keep[..., capacity:]


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=4)
def controlled_step(cfg: LMConfig, scfg: SparsityConfig, params: dict, prefix: SharedPrefix,
                    suffix: SuffixCache, tokens_bk: jax.Array, controls: Controls | None = None):
    """Appends one token per ``(block, schedule)`` row under per-row controls.

    ``tokens_bk [B, K]``; ``controls`` fields ``[B, K]`` (None = dense, no masks at all). Returns
    ``(logits [B, K, V] fp32, h [B, K, D], suffix, StepInfo)``; ``h`` is the final-norm hidden state.
    Positions continue from ``prefix.lengths + suffix.length``.
    """
    B, K = tokens_bk.shape
    M = prefix.capacity
    T = suffix.k.shape[3]
    Hq, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = Hq // Hkv
    t = suffix.length
    inv_freq = L.rope_inv_freq(cfg)
    positions = jnp.broadcast_to((prefix.lengths + t)[:, None], (B, K))
    kv_len = positions + 1  # [B, K], keys including the current one
    valid_p = (jnp.arange(M)[None, :] < prefix.lengths[:, None])[:, None, None, None, :]  # [B,1,1,1,M]
    valid_s = (jnp.arange(T) <= t)  # [T]

    if controls is not None:
        effective = kv_len > scfg.min_effective_kv
        kappa = jnp.where(effective, controls.kappa.astype(jnp.float32), 1.0)
        rho = jnp.where(effective, controls.rho.astype(jnp.float32), 1.0)
        bits = jnp.where(effective, controls.bits.astype(jnp.int32), 16)
    else:
        effective = jnp.zeros((B, K), bool)

    xs = (params["layers"], prefix.k, prefix.v, suffix.k, suffix.v, prefix.kmax, prefix.kmin)  # kmax/kmin: None
    scale = 1.0 / math.sqrt(Dh)

    def layer(x, xs):
        lp, pk, pv, sk, sv, pmax, pmin = xs
        h = L.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = L.project_qkv(lp, h.reshape(B * K, 1, -1), positions.reshape(B * K, 1), cfg, inv_freq)
        q = q.reshape(B, K, Hq, Dh)
        k_new, v_new = k.reshape(B, K, Hkv, Dh), v.reshape(B, K, Hkv, Dh)
        sk = jax.lax.dynamic_update_slice_in_dim(sk, k_new[:, :, None], t, axis=2)
        sv = jax.lax.dynamic_update_slice_in_dim(sv, v_new[:, :, None], t, axis=2)
        qg = q.reshape(B, K, Hkv, G, Dh)
        logits_p = logits_s = None  # the kernel path never scores every key
        if scfg.attention_impl == "xla":
            logits_p = jnp.einsum("bkhgd,bmhd->bkhgm", qg, pk, preferred_element_type=jnp.float32) * scale
            logits_s = jnp.einsum("bkhgd,bkthd->bkhgt", qg, sk, preferred_element_type=jnp.float32) * scale
        mask_p, mask_s = valid_p, valid_s
        if controls is not None:
            keep_p, keep_s = _keep_masks(scfg, q, logits_p, logits_s, (pmax, pmin, prefix.page_valid), sk,
                                         prefix.lengths, t, kappa, M)
            keep_p = keep_p.reshape(B, K, Hkv, G, M)
            keep_s = keep_s.reshape(B, K, Hkv, G, T)
            mask_p, mask_s = mask_p & keep_p, mask_s & keep_s
        kept = jnp.broadcast_to(mask_p.sum(-1) + mask_s.sum(-1), (B, K, Hkv, G)).reshape(B, K, Hq)
        if scfg.attention_impl == "xla":
            scores = jnp.concatenate([jnp.where(mask_p, logits_p, lm.MASK_VALUE),
                                      jnp.where(mask_s, logits_s, lm.MASK_VALUE)], axis=-1)
            probs = jax.nn.softmax(scores, axis=-1)
            attn = (jnp.einsum("bkhgm,bmhd->bkhgd", probs[..., :M].astype(pv.dtype), pv)
                    + jnp.einsum("bkhgt,bkthd->bkhgd", probs[..., M:].astype(sv.dtype), sv))
        else:
            attn = kernel_path.page_attention(qg, pk, pv, prefix.lengths, sk, sv, mask_p, mask_s,
                                              page_size=scfg.page_size, impl=scfg.attention_impl,
                                              interpret=scfg.kernel_interpret)
        x = x + L.output_proj(lp, attn.reshape(B, K, Hq, Dh), cfg)
        h2 = L.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        if scfg.mlp_impl == "pallas":
            out = kernel_path.sparse_mlp(lp, h2, rho if controls is not None else None,
                                         bits if controls is not None else None,
                                         interpret=scfg.kernel_interpret)
        else:
            if controls is not None:
                h2 = prune_topk(h2, rho)
            if scfg.mlp_impl == "cpu":  # the pruned channels' weight rows are never read
                out = swiglu_cpu(h2.reshape(B * K, -1), lp["w_gate"], lp["w_up"], lp["w_down"]).reshape(h2.shape)
            else:
                out = L.mlp(lp, h2)
            if controls is not None:
                out = fake_quant(out, bits)
        return x + out, (k_new, v_new, kept.astype(jnp.int32))

    x = lm.embed(params, tokens_bk)
    x, (k_new, v_new, kept) = jax.lax.scan(layer, x, xs)  # kept [L, B, K, Hq]
    h = L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    suffix = SuffixCache(
        k=jax.lax.dynamic_update_slice_in_dim(suffix.k, k_new[:, :, :, None], t, axis=3),
        v=jax.lax.dynamic_update_slice_in_dim(suffix.v, v_new[:, :, :, None], t, axis=3),
        length=t + 1,
    )
    attended = kept.mean(axis=(0, 3), dtype=jnp.float32) / kv_len.astype(jnp.float32)
    info = StepInfo(effective=effective, attended=attended, kept_keys=jnp.moveaxis(kept, 0, 2))
    return lm.logits(cfg, params, h), h, suffix, info
