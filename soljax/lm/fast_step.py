"""The fast decode step for serving: each action level is a static-shape branch.

:func:`fast_step` computes what :func:`soljax.lm.controlled.controlled_step` computes for rows of
one schedule each (``K = 1``, any batch B) under QUEST, with the same decisions (the same kept
pages, channels and bits), but it only does the work the chosen levels need. In every layer:

* **attention**: ``lax.switch`` on the token-keep level. The dense level (kappa = 1) attends every
  valid key with no scoring. A sparse level kappa scores the QUEST pages from the prefix's page
  summaries, takes the union of the pages the query heads of each KV-head group keep, and
  *gathers only those pages* (:func:`soljax.kernels.ops.quest_decode_attention`, ``impl`` xla,
  pallas or cpu; the cpu kernel reads them in place, and also serves the dense level over every
  valid page). The gather is sized statically per level: page capacities ``c * n`` for ``c`` in
  :data:`UNION_TIERS` (``n`` = the level's page budget at the longest ``kv_len``, capped at the
  group size ``G``, since a group's union holds at most ``G * n`` pages unless scores tie), the
  smallest tier that holds the union running. A union larger than every tier (ties at the
  threshold) and any kappa that is not a level run the masked path, so results never depend on
  capacities.
* **MLP**: ``lax.switch`` on the input-keep level. rho = 1 runs the plain MLP (no top-k);
  a level rho < 1 prunes the input to its top ``ceil(rho * D)`` channels and either multiplies the
  masked input by the whole weights (``mlp="masked"``, the CPU default: XLA:CPU gathers of weight
  rows cost more than they save, see docs/benchmarks.md) or gathers the kept rows of ``w_gate`` /
  ``w_up`` (``mlp="gather"``, statically sized ``ceil(rho * D)`` rows; a tie that keeps more runs
  the masked branch), or runs the Pallas kernels (``mlp="pallas"``: the channel-gathered gate/up
  and the down projection with the fake quantizer as its epilogue, :func:`soljax.lm.kernel_path.sparse_mlp`,
  for any rho and bits; the dense MLP when both are dense), or runs the C++ kernel (``mlp="cpu"``:
  the pruned input, reading each layer's weights in place and only the kept channels' rows of
  ``w_gate`` / ``w_up``, :func:`soljax.kernels.swiglu_cpu.swiglu_cpu`).
* **bits**: ``lax.switch`` on the bits level: 16 skips the quantizer, b < 16 fake-quantizes with
  a static width (fake quantization is a quality control, not a time saving: see
  docs/benchmarks.md).

With several rows, one branch per axis serves them all (see :func:`fast_step`): the rows'
selections merge into the largest of their sparse levels, and rows that need different kinds of
work (dense and sparse) run the general masked branch. Results equal the masked step up to float32
summation order. :class:`Levels` holds the static level values (from an action grid); the dense
value of each axis is always a level.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from soljax.compress import attention as sparse
from soljax.compress.prune import prune_mask, prune_topk
from soljax.compress.quant import fake_quant
from soljax.errors import SoljaxError
from soljax.kernels import ops
from soljax.kernels.quest_attention import pages_from_keep
from soljax.kernels.quest_attention_cpu import every_page
from soljax.kernels.swiglu_cpu import swiglu_cpu
from soljax.lm import kernel_path
from soljax.lm import layers as L
from soljax.lm import model as lm
from soljax.lm.config import LMConfig
from soljax.lm.controlled import Controls, SharedPrefix, SparsityConfig, StepInfo, SuffixCache

UNION_TIERS = (1.0, 1.5, 2.0, 3.0, 4.0)  # page capacities per KV head, in multiples of the level's budget
MLP_PATHS = ("masked", "gather", "pallas", "cpu")


def _f32(v) -> float:
    return float(np.float32(v))


@dataclasses.dataclass(frozen=True)
class FastPath:
    """How the fast step runs (static): the ``levels`` that get their own branch, the MLP
    formulation (``mlp``: masked | gather | pallas | cpu) and the page-gather implementation
    (``attention_impl``: xla | pallas | cpu, with ``interpret`` for Pallas on CPU)."""

    levels: "Levels"
    mlp: str = "masked"
    attention_impl: str = "xla"
    interpret: bool = False

    def __post_init__(self):
        if self.mlp not in MLP_PATHS:
            raise SoljaxError(f"the fast path's mlp must be one of {MLP_PATHS}, got {self.mlp!r}")
        ops.check_impl("the fast path's attention_impl", self.attention_impl, ops.ATTENTION_IMPLS)


@dataclasses.dataclass(frozen=True)
class Levels:
    """Static level values per axis: ``keep`` (kappa), ``rho`` and ``bits``, each sorted and
    distinct, the dense value (1.0, 1.0, 16) always included; kappa and rho as float32 values
    (what the controls carry)."""

    keep: tuple[float, ...]
    rho: tuple[float, ...]
    bits: tuple[int, ...]

    @classmethod
    def of(cls, keep=(), rho=(), bits=()) -> "Levels":
        """Levels from any values (duplicates dropped, the dense values added)."""
        return cls(keep=tuple(sorted({_f32(v) for v in keep} | {1.0})),
                   rho=tuple(sorted({_f32(v) for v in rho} | {1.0})),
                   bits=tuple(sorted({int(b) for b in bits} | {16})))

    @classmethod
    def from_grid(cls, grid) -> "Levels":
        """The levels of an :class:`~soljax.compress.actions.ActionGrid`."""
        return cls.of(grid.kappa.tolist(), grid.rho.tolist(), grid.bits.tolist())


def union_capacities(kappa: float, kv_max: int, prefix_pages: int, page_size: int, group: int) -> tuple[int, ...]:
    """Static page capacities (ascending, distinct, at most ``prefix_pages``) of a sparse level."""
    n = -(-math.ceil(np.float32(kappa) * np.float32(kv_max)) // page_size)
    caps = sorted({min(prefix_pages, max(1, math.ceil(t * n))) for t in UNION_TIERS if t <= group})
    return tuple(caps)


def _gather_attention(q, k_all, v_all, layer, prefix_len, sk, sv, mask_s, pages, num, heads, page_size):
    """Attention of each row's query ``q [B, Hq, Dh]`` over only its listed prefix pages (``pages
    [B, Hkv, NP]``, the first ``num [B, Hkv]`` used, ``heads [B, Hkv, NP]`` bitmask of the group's
    query heads reading each) plus its suffix ``sk``/``sv [B, T, Hkv, Dh]`` where ``mask_s [B, T, Hq]``:
    the gather reads ``NP * page_size`` keys per row and KV head straight from the whole cache
    ``[L, B, M, Hkv, Dh]``."""
    B, Hkv, NP = pages.shape
    G = q.shape[1] // Hkv
    N = NP * page_size
    pos = pages[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)  # [B, Hkv, NP, ps]
    valid = (jnp.arange(NP) < num[..., None])[..., None] & (pos < prefix_len[:, None, None, None])
    posc = jnp.clip(pos, 0, k_all.shape[2] - 1).reshape(B, Hkv, N).transpose(0, 2, 1)  # [B, N, Hkv]
    b, h = jnp.arange(B)[:, None, None], jnp.arange(Hkv)[None, None, :]
    kp = k_all[layer, b, posc, h]  # [B, N, Hkv, Dh]
    vp = v_all[layer, b, posc, h]
    g = jnp.arange(G, dtype=jnp.int32)
    bits = ((heads[..., None] >> g) & 1) == 1  # [B, Hkv, NP, G]
    mask_p = (bits[:, :, :, None, :] & valid[..., None]).reshape(B, Hkv, N, G).transpose(0, 2, 1, 3)
    # slots outside the selection get weight exp(MASK_VALUE - max) = 0 exactly, as in the masked
    # path (their keys and values are cache entries, finite), so the values need no masking pass
    return L.block_diagonal_attention(q, [(kp, vp, mask_p.reshape(B, N, Hkv * G)), (sk, sv, mask_s)], lm.MASK_VALUE)


MLP_WEIGHTS = ("w_gate", "w_up", "w_down")


def _gather_mlp(weights: dict, layer, x_bd: jax.Array, keep_bd: jax.Array, capacity: int) -> jax.Array:
    """SwiGLU of each row of ``x_bd [B, D]`` pruned to its ``keep_bd``, gathering the row's
    ``capacity`` kept rows of the layer's gate/up straight from the stacked ``[L, D, F]`` weights
    (the caller guarantees at most ``capacity`` kept channels per row)."""
    def row(x_d, keep_d):
        idx = jnp.nonzero(keep_d, size=capacity, fill_value=0)[0]
        used = jnp.arange(capacity) < keep_d.sum()
        xs = jnp.where(used, x_d[idx], 0)
        g = xs @ weights["w_gate"][layer, idx]
        u = xs @ weights["w_up"][layer, idx]
        return (jax.nn.silu(g) * u) @ weights["w_down"][layer]

    return jax.vmap(row)(x_bd, keep_bd)


def _shared_branch(values_b: jax.Array, levels: tuple, merge: bool) -> jax.Array:
    """The one branch index that serves every row: the rows' level when they all share it; with
    ``merge``, the largest level when every row is at a level below the dense one (the largest),
    whose branch serves smaller values too; otherwise ``len(levels)``, the general branch."""
    hits = jnp.asarray(levels, values_b.dtype)[None, :] == values_b[:, None]
    idx = jnp.where(hits.any(-1), jnp.argmax(hits, -1), len(levels)).astype(jnp.int32)  # [B]
    shared = jnp.where(jnp.all(idx == idx[0]), idx[0], len(levels))
    if merge:
        shared = jnp.where(jnp.all(idx < len(levels) - 1), idx.max(), shared)
    return shared


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=5)
def fast_step(cfg: LMConfig, scfg: SparsityConfig, path: FastPath, params: dict, prefix: SharedPrefix,
              suffix: SuffixCache, tokens_bk: jax.Array, controls: Controls | None = None):
    """:func:`~soljax.lm.controlled.controlled_step` of rows of one schedule each, reading only what
    their levels need.

    ``tokens_bk [B, 1]``; ``controls`` fields ``[B, 1]`` (None = dense). Needs the QUEST criterion
    (whole pages). ``path``: the levels and formulations (:class:`FastPath`). Returns what
    ``controlled_step`` returns. The rows of a batch run one branch per axis and layer, chosen so
    that it serves every row exactly: their shared level; on the token and MLP-input axes the
    largest of their levels when all are sparse (each row selects at its own value, which fits the
    larger level's static sizes); otherwise the general (masked) branch.
    """
    levels, mlp = path.levels, path.mlp
    B, K = tokens_bk.shape
    if K != 1:
        raise SoljaxError(f"the fast decode step serves rows of one schedule each, got tokens of shape {(B, K)}")
    if scfg.criterion != "quest":
        raise SoljaxError(f"the fast decode step gathers QUEST pages: it needs criterion 'quest', got "
                          f"{scfg.criterion!r}")
    M = prefix.capacity
    T = suffix.k.shape[3]
    Hq, Hkv, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    G = Hq // Hkv
    ps = scfg.page_size
    Pp = prefix.page_valid.shape[1]
    t = suffix.length
    inv_freq = L.rope_inv_freq(cfg)
    prefix_len = prefix.lengths  # [B]
    position = prefix_len + t  # [B]
    kv_len = position + 1
    valid_p = jnp.arange(M)[None, :] < prefix_len[:, None]  # [B, M]
    valid_s = jnp.arange(T) <= t  # [T]
    page_count = jnp.clip(prefix_len[:, None] - jnp.arange(Pp)[None, :] * ps, 0, ps)  # [B, Pp] valid slots

    if controls is None:
        kappa, rho = jnp.ones((B,), jnp.float32), jnp.ones((B,), jnp.float32)
        bits = jnp.full((B,), 16, jnp.int32)
        effective = jnp.zeros((B, 1), bool)
    else:
        effective = (kv_len > scfg.min_effective_kv)[:, None]
        eff = effective[:, 0]
        kappa = jnp.where(eff, controls.kappa[:, 0].astype(jnp.float32), 1.0)
        rho = jnp.where(eff, controls.rho[:, 0].astype(jnp.float32), 1.0)
        bits = jnp.where(eff, controls.bits[:, 0].astype(jnp.int32), 16)
    i_keep = _shared_branch(kappa, levels.keep, merge=True)
    i_rho = _shared_branch(rho, levels.rho, merge=True)
    i_bits = _shared_branch(bits, levels.bits, merge=False)
    kv_max = M + T
    mask = lm.MASK_VALUE

    def layer(x, xs):
        lp, sk, sv, li = xs  # sk/sv [B, 1, T, Hkv, Dh]; li: the layer index into the prefix cache
        h = L.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = L.project_qkv(lp, h, position[:, None], cfg, inv_freq)  # q [B, 1, Hq, Dh]
        sk = jax.lax.dynamic_update_slice_in_dim(sk, k[:, :, None], t, axis=2)
        sv = jax.lax.dynamic_update_slice_in_dim(sv, v[:, :, None], t, axis=2)
        suffix_kv = (sk[:, 0], sv[:, 0])  # [B, T, Hkv, Dh]

        def selection(kap_b):
            summaries = (prefix.kmax[li], prefix.kmin[li], prefix.page_valid)
            return sparse.quest_pages_shared(q, summaries, prefix_len, sk, t + 1, kap_b[:, None], ps)

        def kept_of(page_keep, keep_s):  # [B, Hq] keys attended per query head
            return (page_keep[:, 0] * page_count[:, None, :]).sum(-1) + (keep_s[:, 0] & valid_s).sum(-1)

        def suffix_mask(keep_s):  # [B, T, Hq]
            return (keep_s[:, 0] & valid_s).transpose(0, 2, 1)

        def kernel_attention(pages, num, heads, suffix_keep):  # the prefix cache read in place at layer li
            out = ops.quest_decode_attention(q, prefix.k, prefix.v, prefix_len, sk, sv, suffix_keep, pages, num,
                                             heads, page_size=ps, impl=path.attention_impl,
                                             interpret=path.interpret, layer=li)
            return out.reshape(B, Hq, Dh)

        def dense_branch():
            if path.attention_impl == "cpu":  # every valid page, for every query head
                attn = kernel_attention(*every_page(prefix_len, M, Hkv, G, ps),
                                        jnp.broadcast_to(valid_s, (B, 1, Hq, T)))
            else:
                attn = L.block_diagonal_attention(q[:, 0], [(prefix.k[li], prefix.v[li], valid_p[:, :, None]),
                                                            (*suffix_kv, valid_s[None, :, None])], mask)
            return attn, jnp.broadcast_to(kv_len[:, None], (B, Hq)).astype(jnp.int32)

        def masked_branch():  # any kappa: the masked path's keys, every key scored
            page_keep, keep_s = selection(kappa)
            keep_p = jnp.repeat(page_keep[:, 0], ps, axis=-1)[..., :M] & valid_p[:, None, :]  # [B, Hq, M]
            attn = L.block_diagonal_attention(q[:, 0], [(prefix.k[li], prefix.v[li], keep_p.transpose(0, 2, 1)),
                                                        (*suffix_kv, suffix_mask(keep_s))], mask)
            return attn, kept_of(page_keep, keep_s)

        def gather(page_keep, keep_s, capacity):
            pages, num, heads = pages_from_keep(page_keep, Hkv, capacity)
            if path.attention_impl == "xla":
                return _gather_attention(q[:, 0], prefix.k, prefix.v, li, prefix_len, *suffix_kv, suffix_mask(keep_s),
                                         pages[:, 0], num[:, 0], heads[:, 0], ps)
            return kernel_attention(pages, num, heads, keep_s & valid_s)

        def sparse_branch(level: float):
            caps = union_capacities(level, kv_max, Pp, ps, G)

            def run():  # every row's kappa is a level at most ``level``: its union fits these capacities
                page_keep, keep_s = selection(kappa)
                union = page_keep[:, 0].reshape(B, Hkv, G, Pp).any(axis=2).sum(-1).max()
                tier = jnp.searchsorted(jnp.asarray(caps), union)  # smallest capacity >= union
                branches = [functools.partial(gather, page_keep, keep_s, c) for c in caps]
                branches.append(lambda: masked_branch()[0])  # ties beyond every tier
                return jax.lax.switch(tier, branches), kept_of(page_keep, keep_s)
            return run

        keep_branches = [dense_branch if lv >= 1.0 else sparse_branch(lv) for lv in levels.keep]
        attn, kept = jax.lax.switch(i_keep, keep_branches + [masked_branch])
        x = x + L.output_proj(lp, attn[:, None], cfg)
        h2 = L.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)  # [B, 1, D]

        def mlp_weights():  # the layer's MLP weights, sliced inside the branch that reads them all
            return {n: stacked[n][li] for n in MLP_WEIGHTS}

        def swiglu(x):  # [B, 1, D]
            if mlp == "cpu":  # the layer's weights read in place, zero (pruned) channels' rows skipped
                return swiglu_cpu(x[:, 0], *(stacked[n] for n in MLP_WEIGHTS), layer=li)[:, None]
            return L.mlp(mlp_weights(), x)

        def mlp_dense():
            return swiglu(h2)

        def mlp_masked():  # any rho per row
            return swiglu(prune_topk(h2, rho[:, None]))

        def mlp_gathered(level: float):
            capacity = int(np.clip(np.ceil(np.float32(level) * np.float32(D)), 1, D))  # prune_counts

            def run():  # every row's rho is a level at most ``level``
                keep = prune_mask(h2[:, 0], rho)  # [B, D]
                return jax.lax.cond(jnp.all(keep.sum(-1) <= capacity),
                                    lambda: _gather_mlp(stacked, li, h2[:, 0], keep, capacity)[:, None],
                                    mlp_masked)
            return run

        if mlp == "pallas":  # the kernels prune, read the kept rows only and quantize in the epilogue
            def mlp_kernel():
                return kernel_path.sparse_mlp(mlp_weights(), h2, rho[:, None], bits[:, None],
                                              interpret=path.interpret)
            dense = (i_rho == len(levels.rho) - 1) & (i_bits == len(levels.bits) - 1)
            return x + jax.lax.cond(dense, mlp_dense, mlp_kernel), (k[:, 0], v[:, 0], kept.astype(jnp.int32))
        if mlp in ("masked", "cpu"):  # every sparse level runs the same computation
            out = jax.lax.cond(i_rho == len(levels.rho) - 1, mlp_dense, mlp_masked)
        else:
            mlp_branches = [mlp_dense if lv >= 1.0 else mlp_gathered(lv) for lv in levels.rho]
            out = jax.lax.switch(i_rho, mlp_branches + [mlp_masked])
        quant = [(lambda: out) if b >= 16 else functools.partial(fake_quant, out, b) for b in levels.bits]
        out = jax.lax.switch(i_bits, quant + [lambda: fake_quant(out, bits[:, None])])
        return x + out, (k[:, 0], v[:, 0], kept.astype(jnp.int32))

    # The MLP weights and the prefix cache are indexed by layer inside the branches that read them
    # (scanning over them would copy each layer's whole slice before any branch runs).
    stacked = {n: params["layers"][n] for n in MLP_WEIGHTS}
    per_layer = {n: w for n, w in params["layers"].items() if n not in MLP_WEIGHTS}
    xs = (per_layer, suffix.k, suffix.v, jnp.arange(cfg.num_layers))
    x = lm.embed(params, tokens_bk)
    x, (k_new, v_new, kept) = jax.lax.scan(layer, x, xs)  # k_new [L, B, Hkv, Dh], kept [L, B, Hq]
    h = L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    suffix = SuffixCache(
        k=jax.lax.dynamic_update_slice_in_dim(suffix.k, k_new[:, :, None, None], t, axis=3),
        v=jax.lax.dynamic_update_slice_in_dim(suffix.v, v_new[:, :, None, None], t, axis=3),
        length=t + 1,
    )
    attended = (kept.mean(axis=(0, 2), dtype=jnp.float32) / kv_len.astype(jnp.float32))[:, None]  # [B, 1]
    info = StepInfo(effective=effective, attended=attended, kept_keys=jnp.moveaxis(kept, 0, 1)[:, None])
    return lm.logits(cfg, params, h), h, suffix, info
