"""Token sparsity for one decode query per row: which cached keys each query head may attend to.

Shapes (one layer): query ``q [R, Hq, Dh]`` (post-RoPE), keys ``k [R, S, Hkv, Dh]`` (post-RoPE, S =
cache capacity, the current token already written at ``kv_len - 1``), ``kv_len [R]`` (valid keys
including the current one), ``kappa [R]`` (token keep fraction). Query head ``h`` reads KV head
``h // (Hq // Hkv)``. Masks are boolean, True = attend; positions ``>= kv_len`` are never kept.

Three criteria:

- **QUEST** (:func:`quest_keep`): pages of ``page_size`` keys from position 0; each query head ranks
  pages by the upper bound ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` and keeps the best
  ``ceil(ceil(kappa * kv_len) / page_size)`` pages (ties keep more). Nothing is forced: not the sink,
  not the window, not the current token; a head that keeps nothing (only possible with NaN scores)
  falls back to the newest valid key. Budgets are float32 products, ``ceil(float32(kappa) *
  kv_len)`` clamped to ``[1, kv_len]``.
- **recency** (:func:`recency_keep`): the first ``Ts`` keys and a window of recent keys, shared by
  all heads.
- **relevancy** (:func:`relevancy_keep`): the first ``Ts`` keys, the last ``Tw + 2`` keys and the
  top ``ceil(kappa * #eligible)`` of the remaining keys by scaled logit.

QUEST in pieces, for a decode step over a shared prefix
--------------------------------------------------------
:func:`page_summaries` (per-page key max/min) is what a prefill computes once and shares across
schedules; :func:`quest_scores` and :func:`select_pages` rank pages; :func:`token_keep_from_pages`
expands kept pages to key positions. When a row's keys are an M-key shared prefix followed by up to T
per-schedule suffix keys at positions ``M, M+1, ...``, pages ``[0, M // page_size)`` are complete
prefix pages and every later page lies in the *window* summarized by
:func:`window_page_summaries` (window page 0 is absolute page ``M // page_size``; pass the prefix
summaries to merge the page that straddles the boundary). Selecting over the union
``[prefix pages < M // page_size] + [window pages]`` with one threshold gives exactly the pages
:func:`quest_keep` would keep over the concatenated keys (see :func:`quest_keep_split`).
:func:`merge_page_summaries` builds the summaries of the concatenated keys in absolute page order
instead, when one array is more convenient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from soljax.compress.select import top_k_mask
from soljax.errors import SoljaxError

HIGHEST = jax.lax.Precision.HIGHEST

# Summaries of a page with no valid key: the identities of max and min, so merging is max/min.
EMPTY_MAX = -jnp.inf
EMPTY_MIN = jnp.inf


def _rows(v, dtype) -> jax.Array:
    return jnp.asarray(v).astype(dtype)


def _check_page_size(page_size) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise SoljaxError(f"QUEST page size must be a positive integer, got {page_size!r}")
    return page_size


# ---------------------------------------------------------------------------------------- budgets


def quest_token_budget(kappa: jax.Array, kv_len: jax.Array) -> jax.Array:
    """Token budget ``clamp(ceil(float32(kappa) * kv_len), 1, kv_len)`` per row (int32)."""
    kv = _rows(kv_len, jnp.int32)
    n = jnp.ceil(_rows(kappa, jnp.float32) * kv.astype(jnp.float32))
    return jnp.clip(n, 1, jnp.maximum(kv, 1).astype(jnp.float32)).astype(jnp.int32)


def quest_page_budget(n_tok: jax.Array, page_size: int, num_valid_pages: jax.Array) -> jax.Array:
    """Page budget ``min(ceil(n_tok / page_size), num_valid_pages)`` per row (int32)."""
    n_tok = _rows(n_tok, jnp.int32)
    return jnp.minimum((n_tok + page_size - 1) // page_size, _rows(num_valid_pages, jnp.int32))


# -------------------------------------------------------------------------------- page summaries


def _summarize(keys: jax.Array, valid: jax.Array, page_size: int):
    """Per-page max/min of ``keys [R, P*page_size, H, Dh]`` over ``valid [R, P*page_size]``."""
    R, W, H, Dh = keys.shape
    P = W // page_size
    pages = keys.reshape(R, P, page_size, H, Dh)
    v = valid.reshape(R, P, page_size)
    # A running max/min over the page's slots, elementwise on contiguous [R, P, H, Dh] slices: XLA
    # fuses it into one pass over the keys (a reduction over the middle axis ran 8-10x slower on CPU).
    kmax = jnp.full((R, P, H, Dh), EMPTY_MAX, keys.dtype)
    kmin = jnp.full((R, P, H, Dh), EMPTY_MIN, keys.dtype)
    for j in range(page_size):
        vj = v[:, :, j, None, None]
        kmax = jnp.maximum(kmax, jnp.where(vj, pages[:, :, j], EMPTY_MAX))
        kmin = jnp.minimum(kmin, jnp.where(vj, pages[:, :, j], EMPTY_MIN))
    return kmax, kmin, v.any(axis=2)


def page_summaries(k: jax.Array, kv_len: jax.Array, page_size: int):
    """Per-page, per-channel key max and min over the valid keys of each page.

    ``k [R, S, Hkv, Dh]``, ``kv_len [R]`` -> ``(kmax [R, P, Hkv, Dh], kmin [R, P, Hkv, Dh],
    page_valid [R, P])`` with ``P = ceil(S / page_size)``, page j covering positions
    ``[j * page_size, (j + 1) * page_size)``. Pages without a valid key hold -inf / +inf (the
    identities of max / min) and are not valid. Values keep k's dtype.
    """
    R, S, H, Dh = k.shape
    P = -(-S // _check_page_size(page_size))
    pad = P * page_size - S
    valid = jnp.arange(P * page_size)[None, :] < _rows(kv_len, jnp.int32)[:, None]
    keys = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else k
    return _summarize(keys, valid, page_size)


def refresh_page_summaries(kmax: jax.Array, kmin: jax.Array, k: jax.Array, first: jax.Array, kv_len: jax.Array,
                           count: int, page_size: int):
    """:func:`page_summaries` of ``k [R, S, Hkv, Dh]`` after positions ``[first, first + count)`` of
    each row were written (``first [R]``; ``kv_len [R]`` now), from ``kmax``/``kmin [R, P, Hkv, Dh]``
    of the keys before: only the pages holding those positions are summarized again, so appending
    ``count`` keys costs work in ``count``, not in S. Returns ``(kmax, kmin)``."""
    R, S = k.shape[:2]
    P = kmax.shape[1]
    W = min(P, window_pages(count, _check_page_size(page_size)))  # pages ``count`` positions can touch
    start = jnp.clip(_rows(first, jnp.int32) // page_size, 0, P - W)  # [R] first page summarized again
    pos = (start * page_size)[:, None] + jnp.arange(W * page_size)[None, :]  # [R, W * page_size]
    keys = k[jnp.arange(R)[:, None], jnp.minimum(pos, S - 1)]
    wmax, wmin, _ = _summarize(keys, pos < _rows(kv_len, jnp.int32)[:, None], page_size)
    rows, pages = jnp.arange(R)[:, None], start[:, None] + jnp.arange(W)[None, :]
    return kmax.at[rows, pages].set(wmax), kmin.at[rows, pages].set(wmin)


def window_pages(num_suffix: int, page_size: int) -> int:
    """Pages in the window of :func:`window_page_summaries`: ``ceil((T + page_size - 1) / page_size)``."""
    return -(-(num_suffix + page_size - 1) // page_size)


def window_page_summaries(k_suffix: jax.Array, prefix_len: jax.Array, suffix_len: jax.Array,
                          page_size: int, prefix=None):
    """Summaries of the pages holding a per-row suffix of keys that follows a prefix.

    ``k_suffix [R, T, Hkv, Dh]``: suffix key j sits at absolute position ``prefix_len + j``;
    entries ``j >= suffix_len`` are ignored. Returns ``(kmax, kmin, page_valid, first_page)``
    with ``Pw = window_pages(T, page_size)`` window pages: window page i is absolute page
    ``first_page + i``, ``first_page = prefix_len // page_size [R]``.

    ``prefix``: optional ``(kmax, kmin, page_valid)`` of the prefix (from :func:`page_summaries`,
    same rows R). When given, the prefix page that straddles the boundary (absolute page
    ``first_page``, partly filled when ``prefix_len % page_size != 0``) is merged into window page
    0, so that prefix pages ``< first_page`` and the window pages together describe every key exactly
    once.
    """
    R, T, H, Dh = k_suffix.shape
    Pw = window_pages(T, _check_page_size(page_size))
    prefix_len = _rows(prefix_len, jnp.int32)
    first_page = prefix_len // page_size
    offset = prefix_len % page_size
    j = jnp.arange(Pw * page_size)[None, :] - offset[:, None]  # suffix index of each window slot
    valid = (j >= 0) & (j < _rows(suffix_len, jnp.int32)[:, None])
    keys = k_suffix[jnp.arange(R)[:, None], jnp.clip(j, 0, T - 1)]  # [R, Pw*page_size, H, Dh]
    kmax, kmin, page_valid = _summarize(keys, valid, page_size)
    if prefix is not None:
        pmax, pmin, pvalid = prefix
        Pp = pmax.shape[1]
        has = first_page < Pp
        idx = jnp.minimum(first_page, Pp - 1)
        rows = jnp.arange(R)
        bmax = jnp.where(has[:, None, None], pmax[rows, idx], EMPTY_MAX)
        bmin = jnp.where(has[:, None, None], pmin[rows, idx], EMPTY_MIN)
        bvalid = has & pvalid[rows, idx]
        kmax = kmax.at[:, 0].set(jnp.maximum(kmax[:, 0], bmax.astype(kmax.dtype)))
        kmin = kmin.at[:, 0].set(jnp.minimum(kmin[:, 0], bmin.astype(kmin.dtype)))
        page_valid = page_valid.at[:, 0].set(page_valid[:, 0] | bvalid)
    return kmax, kmin, page_valid, first_page


def merge_page_summaries(prefix, window, first_page: jax.Array, num_pages: int | None = None):
    """Summaries of prefix + suffix keys in absolute page order, from the two parts.

    ``prefix``: ``(kmax, kmin, page_valid)`` with Pp pages (:func:`page_summaries` of the prefix
    cache); ``window``: ``(kmax, kmin, page_valid)`` with Pw pages from
    :func:`window_page_summaries` (with or without ``prefix=``; merging is idempotent);
    ``first_page [R]``. Returns ``(kmax, kmin, page_valid)`` with ``num_pages`` pages (default
    ``Pp + Pw``; window pages past it are dropped, pages past the data are empty), equal to
    :func:`page_summaries` of the concatenated keys.
    """
    pmax, pmin, pvalid = prefix
    wmax, wmin, wvalid = window
    R, Pp = pvalid.shape
    Pw = wvalid.shape[1]
    Pt = Pp + Pw if num_pages is None else int(num_pages)
    if Pt < Pp:
        raise ValueError(f"num_pages={Pt} is smaller than the prefix's {Pp} pages")
    pad = ((0, 0), (0, Pt - Pp), (0, 0), (0, 0))
    pmax = jnp.pad(pmax, pad, constant_values=EMPTY_MAX)
    pmin = jnp.pad(pmin, pad, constant_values=EMPTY_MIN)
    pvalid = jnp.pad(pvalid, ((0, 0), (0, Pt - Pp)))
    i = jnp.arange(Pt)[None, :] - _rows(first_page, jnp.int32)[:, None]  # window page index
    inside = (i >= 0) & (i < Pw)
    rows, ic = jnp.arange(R)[:, None], jnp.clip(i, 0, Pw - 1)
    m = inside[:, :, None, None]
    kmax = jnp.maximum(pmax, jnp.where(m, wmax[rows, ic], EMPTY_MAX).astype(pmax.dtype))
    kmin = jnp.minimum(pmin, jnp.where(m, wmin[rows, ic], EMPTY_MIN).astype(pmin.dtype))
    return kmax, kmin, pvalid | (inside & wvalid[rows, ic])


# --------------------------------------------------------------------------- scoring and selecting


def quest_scores(q: jax.Array, kmax: jax.Array, kmin: jax.Array, page_valid: jax.Array) -> jax.Array:
    """QUEST page scores (float32), -inf on pages without a valid key.

    ``q [R, *E, Hq, Dh]`` (``E``: optional extra axes, e.g. K schedules sharing one row's prefix
    summaries), ``kmax``/``kmin [R, P, Hkv, Dh]``, ``page_valid [R, P]`` -> ``[R, *E, Hq, P]``.
    ``score = q+ . kmax + q- . (-kmin)`` with ``q+ = max(q, 0)``, ``q- = max(-q, 0)`` (unscaled),
    which equals ``sum_d max(q_d kmax_d, q_d kmin_d)``.
    """
    R, Hq, Dh = q.shape[0], q.shape[-2], q.shape[-1]
    extra = q.shape[1:-2]
    Hkv = kmax.shape[2]
    qf = q.astype(jnp.float32).reshape(R, -1, Hkv, Hq // Hkv, Dh)
    q_pos = jnp.maximum(qf, 0.0)
    q_neg = jnp.maximum(-qf, 0.0)
    s = (jnp.einsum("rekgd,rpkd->rekgp", q_pos, kmax.astype(jnp.float32), precision=HIGHEST)
         + jnp.einsum("rekgd,rpkd->rekgp", q_neg, -kmin.astype(jnp.float32), precision=HIGHEST))
    s = jnp.where(page_valid[:, None, None, None, :], s, -jnp.inf)
    return s.reshape(R, *extra, Hq, kmax.shape[1])


def select_pages(scores: jax.Array, page_valid: jax.Array, n_pages_keep: jax.Array) -> jax.Array:
    """Keeps pages scoring at least the ``n``-th largest valid score (ties keep more).

    ``scores [R, *E, Hq, P]``, ``page_valid [R, P]``, ``n_pages_keep [R]`` (int). ``n`` is
    clamped to ``[1, #valid pages]``; when it covers every valid page, all valid pages are kept
    regardless of scores. Returns ``page_keep`` shaped like ``scores``.
    """
    lead = scores.ndim - 1
    expand = (slice(None),) + (None,) * (lead - 1)
    pv = page_valid[expand]  # [R, 1.., P]
    n_valid = page_valid.sum(axis=-1).astype(jnp.int32)
    n_req = _rows(n_pages_keep, jnp.int32)
    n = jnp.clip(n_req, 1, jnp.maximum(n_valid, 1))
    n = jnp.broadcast_to(n[expand], scores.shape[:-1])
    keep = top_k_mask(jnp.where(pv, scores, -jnp.inf), n) & pv & ~jnp.isnan(scores)  # NaN: never kept
    everything = (n_req >= n_valid)[expand + (None,)]
    return keep | (everything & pv)


def quest_select(q: jax.Array, kmax: jax.Array, kmin: jax.Array, page_valid: jax.Array,
                 n_pages_keep: jax.Array) -> jax.Array:
    """``page_keep [R, Hq, P]``: :func:`select_pages` of :func:`quest_scores`."""
    return select_pages(quest_scores(q, kmax, kmin, page_valid), page_valid, n_pages_keep)


def token_keep_from_pages(page_keep: jax.Array, positions: jax.Array, valid: jax.Array,
                          page_size: int) -> jax.Array:
    """Expands ``page_keep [R, Hq, P]`` to key slots at absolute ``positions [R, N]``.

    Returns ``[R, Hq, N]``: slot kept iff ``valid [R, N]`` and its page ``position // page_size``
    is kept (positions past the last page are dropped). No fallback is applied.
    """
    R, Hq, P = page_keep.shape
    page = _rows(positions, jnp.int32) // page_size
    inside = (page >= 0) & (page < P)
    idx = jnp.broadcast_to(jnp.clip(page, 0, P - 1)[:, None, :], (R, Hq, page.shape[1]))
    kept = jnp.take_along_axis(page_keep, idx, axis=-1)
    return kept & (valid & inside)[:, None, :]


def quest_fallback(page_keep: jax.Array) -> jax.Array:
    """``[R, Hq]``: heads that kept no page (they attend to the newest valid key only)."""
    return ~page_keep.any(axis=-1)


def quest_keep(q: jax.Array, k: jax.Array, kv_len: jax.Array, kappa: jax.Array,
               page_size: int) -> jax.Array:
    """QUEST keep mask ``[R, Hq, S]`` for one decode query per row (see the module docstring).

    ``q [R, Hq, Dh]``, ``k [R, S, Hkv, Dh]``, ``kv_len [R]``, ``kappa [R]``. ``kappa = 1`` (or any
    kappa whose page budget covers every valid page) keeps every valid key.
    """
    S = k.shape[1]
    kv_len = _rows(kv_len, jnp.int32)
    kmax, kmin, page_valid = page_summaries(k, kv_len, page_size)
    n_pg = quest_page_budget(quest_token_budget(kappa, kv_len), page_size, page_valid.sum(-1))
    page_keep = quest_select(q, kmax, kmin, page_valid, n_pg)
    pos = jnp.broadcast_to(jnp.arange(S)[None, :], (k.shape[0], S))
    keep = token_keep_from_pages(page_keep, pos, pos < kv_len[:, None], page_size)
    newest = (pos == kv_len[:, None] - 1)[:, None, :]
    return keep | (quest_fallback(page_keep)[:, :, None] & newest)


def _quest_shared_selection(q, prefix, prefix_len, k_suffix, suffix_len, kappa, page_size: int):
    """The page selection of :func:`quest_keep_shared`: ``(keep [R, Hq, Pp + Pw], fallback [R, Hq],
    first [B], pl [R], sl [R])`` (prefix pages, then window pages; R = B * K rows)."""
    B, K, Hq, _ = q.shape
    T = k_suffix.shape[2]
    R = B * K
    pmax, pmin, pvalid = prefix
    Pp = pvalid.shape[1]
    prefix_len = _rows(prefix_len, jnp.int32)
    first = prefix_len // page_size  # [B] absolute page of window page 0
    pvalid_c = pvalid & (jnp.arange(Pp)[None, :] < first[:, None])  # complete prefix pages
    s_prefix = quest_scores(q, pmax, pmin, pvalid_c).reshape(R, Hq, Pp)

    rep = lambda a: jnp.repeat(a, K, axis=0)  # noqa: E731  [B, ...] -> [B*K, ...]
    pl = rep(prefix_len)
    sl = jnp.broadcast_to(_rows(suffix_len, jnp.int32), (B, K)).reshape(R)
    wmax, wmin, wvalid, _ = window_page_summaries(k_suffix.reshape(R, T, *k_suffix.shape[3:]), pl, sl,
                                                  page_size)
    has = first < Pp  # merge the straddling prefix page (one per block) into window page 0
    idx = jnp.minimum(first, Pp - 1)
    blocks = jnp.arange(B)
    bmax = rep(jnp.where(has[:, None, None], pmax[blocks, idx], EMPTY_MAX))
    bmin = rep(jnp.where(has[:, None, None], pmin[blocks, idx], EMPTY_MIN))
    wmax = wmax.at[:, 0].set(jnp.maximum(wmax[:, 0], bmax.astype(wmax.dtype)))
    wmin = wmin.at[:, 0].set(jnp.minimum(wmin[:, 0], bmin.astype(wmin.dtype)))
    wvalid = wvalid.at[:, 0].set(wvalid[:, 0] | rep(has & pvalid[blocks, idx]))

    valid = jnp.concatenate([rep(pvalid_c), wvalid], axis=1)
    scores = jnp.concatenate([s_prefix, quest_scores(q.reshape(R, Hq, -1), wmax, wmin, wvalid)], -1)
    kv_len = pl + sl
    n_pg = quest_page_budget(quest_token_budget(_rows(kappa, jnp.float32).reshape(R), kv_len),
                             page_size, valid.sum(-1))
    keep = select_pages(scores, valid, n_pg)
    return keep, quest_fallback(keep), first, pl, sl


def _suffix_keep(keep_w, fallback, pl, sl, T: int, page_size: int):
    """Suffix slots ``[R, Hq, T]`` kept by the window pages ``keep_w`` (plus the fallback's newest key)."""
    j = jnp.arange(T)[None, :]
    pos_w = pl[:, None] % page_size + j  # position within the window
    out_w = token_keep_from_pages(keep_w, pos_w, j < sl[:, None], page_size)
    newest_w = (j == sl[:, None] - 1)[:, None, :]
    return out_w | (fallback[:, :, None] & newest_w)


def quest_keep_shared(q: jax.Array, prefix, prefix_len: jax.Array, k_suffix: jax.Array,
                      suffix_len: jax.Array, kappa: jax.Array, page_size: int, prefix_capacity: int):
    """QUEST for K schedules that share one summarized prefix per block, each with its own suffix.

    ``q [B, K, Hq, Dh]``; ``prefix = (kmax, kmin, page_valid)`` of the block's prefix cache (one
    copy per block, :func:`page_summaries`); ``prefix_len [B]``; ``k_suffix [B, K, T, Hkv, Dh]``
    with suffix key j at position ``prefix_len + j`` (valid for ``j < suffix_len``; the current
    token is the last valid one); ``suffix_len`` scalar or ``[B, K]``; ``kappa [B, K]``.

    Returns ``(keep_prefix [B, K, Hq, prefix_capacity], keep_suffix [B, K, Hq, T])``, equal to the
    matching slots of :func:`quest_keep` over each row's concatenated keys. Prefix pages are
    scored against the shared summaries (never tiled over K); only the page straddling the
    prefix/suffix boundary and the suffix pages are summarized per schedule.
    """
    B, K, Hq, _ = q.shape
    T = k_suffix.shape[2]
    R = B * K
    Pp = prefix[2].shape[1]
    keep, fallback, first, pl, sl = _quest_shared_selection(q, prefix, prefix_len, k_suffix, suffix_len, kappa,
                                                            page_size)
    keep_p, keep_w = keep[..., :Pp], keep[..., Pp:]
    pos_p = jnp.broadcast_to(jnp.arange(prefix_capacity)[None, :], (R, prefix_capacity))
    in_prefix = pos_p < pl[:, None]
    out_p = token_keep_from_pages(keep_p, pos_p, in_prefix, page_size)
    straddle = in_prefix & (pos_p // page_size == jnp.repeat(first, K, axis=0)[:, None])  # window page 0
    out_p = out_p | (straddle[:, None, :] & keep_w[..., :1])
    kv_len = pl + sl
    newest_p = (pos_p == kv_len[:, None] - 1)[:, None, :]
    out_p = out_p | (fallback[:, :, None] & newest_p)
    out_w = _suffix_keep(keep_w, fallback, pl, sl, T, page_size)
    return out_p.reshape(B, K, Hq, prefix_capacity), out_w.reshape(B, K, Hq, T)


def quest_pages_shared(q: jax.Array, prefix, prefix_len: jax.Array, k_suffix: jax.Array,
                       suffix_len: jax.Array, kappa: jax.Array, page_size: int):
    """The selection of :func:`quest_keep_shared` at page level, for readers that gather pages.

    Same arguments (without the prefix capacity). Returns ``(page_keep [B, K, Hq, Pp],
    keep_suffix [B, K, Hq, T])``: prefix page p is kept by a query head iff it attends the page's
    valid prefix slots (the page straddling the prefix/suffix boundary included, when it holds
    prefix keys); ``keep_suffix`` equals :func:`quest_keep_shared`'s. Expanding ``page_keep`` over
    the valid prefix positions gives :func:`quest_keep_shared`'s ``keep_prefix`` exactly (the
    fallback's newest key is always a suffix key, as the current token is).
    """
    B, K, Hq, _ = q.shape
    T = k_suffix.shape[2]
    Pp = prefix[2].shape[1]
    keep, fallback, first, pl, sl = _quest_shared_selection(q, prefix, prefix_len, k_suffix, suffix_len, kappa,
                                                            page_size)
    keep_p, keep_w = keep[..., :Pp], keep[..., Pp:]
    first_r = jnp.repeat(first, K, axis=0)
    straddle = (jnp.arange(Pp)[None, :] == first_r[:, None]) & (pl % page_size != 0)[:, None]  # [R, Pp]
    page_keep = keep_p | (straddle[:, None, :] & keep_w[..., :1])
    out_w = _suffix_keep(keep_w, fallback, pl, sl, T, page_size)
    return page_keep.reshape(B, K, Hq, Pp), out_w.reshape(B, K, Hq, T)


def quest_keep_split(q: jax.Array, prefix, k_suffix: jax.Array, prefix_len: jax.Array,
                     suffix_len: jax.Array, kappa: jax.Array, page_size: int):
    """QUEST over a summarized prefix plus a per-row key suffix, without concatenating keys.

    ``prefix``: ``(kmax, kmin, page_valid)`` of the prefix cache (Pp pages, rows R);
    ``k_suffix [R, T, Hkv, Dh]`` with suffix key j at position ``prefix_len + j``, ``suffix_len``
    valid (the current token is the last, ``kv_len = prefix_len + suffix_len``). Returns
    ``(keep_prefix [R, Hq, Pp * page_size], keep_suffix [R, Hq, T])`` (slice ``keep_prefix`` to
    the prefix cache's capacity), equal to the matching slots of :func:`quest_keep` over the
    concatenated keys. One schedule per prefix: :func:`quest_keep_shared` with K = 1.
    """
    Pp = prefix[2].shape[1]
    suffix_len = jnp.broadcast_to(_rows(suffix_len, jnp.int32), (q.shape[0],))[:, None]
    keep_p, keep_w = quest_keep_shared(q[:, None], prefix, prefix_len, k_suffix[:, None], suffix_len,
                                       _rows(kappa, jnp.float32)[:, None], page_size, Pp * page_size)
    return keep_p[:, 0], keep_w[:, 0]


# ------------------------------------------------------------------------------ recency, relevancy


def recency_keep_at(positions: jax.Array, kv_len: jax.Array, kappa: jax.Array, Ts: int,
                    Tw: int) -> jax.Array:
    """Recency keep mask at absolute key ``positions [R, N]`` -> ``[R, N]``, shared by all heads.

    With ``K = kv_len``: keep all K keys if ``K <= Ts + Tw + 1``; else keep ``[0, Ts)`` and
    ``[max(Ts, K - (Tw + 1 + Ke)), K)`` with ``Ke = ceil(kappa * (K - (Ts + Tw + 1)))``. The product
    is taken in float32 (it can differ from a float64 product when it lies within half a float32
    ulp of an integer, e.g. float32(0.3) * 10).
    """
    K = _rows(kv_len, jnp.int32)[:, None]
    pos = _rows(positions, jnp.int32)
    short = K <= Ts + Tw + 1
    num_old = jnp.maximum(K - (Ts + Tw + 1), 0)
    ke = jnp.ceil(_rows(kappa, jnp.float32)[:, None] * num_old.astype(jnp.float32)).astype(jnp.int32)
    start = jnp.maximum(Ts, K - (Tw + 1 + ke))
    keep = (pos < Ts) | (pos >= start)
    return (short | keep) & (pos >= 0) & (pos < K)


def recency_keep(kv_len: jax.Array, kappa: jax.Array, S: int, Ts: int, Tw: int) -> jax.Array:
    """Recency keep mask ``[R, S]`` over cache slots ``0..S-1`` (see :func:`recency_keep_at`)."""
    kv_len = _rows(kv_len, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(S)[None, :], (kv_len.shape[0], S))
    return recency_keep_at(pos, kv_len, kappa, Ts, Tw)


def relevancy_keep_logits(logits: jax.Array, positions: jax.Array, kv_len: jax.Array,
                          kappa: jax.Array, Ts: int, Tw: int, tier: str = "per_head") -> jax.Array:
    """Relevancy keep mask from scaled logits ``[R, Hq, N]`` of keys at ``positions [R, N]``.

    Keys at positions ``>= kv_len`` (or negative) are invalid. Always kept: valid positions
    ``< Ts`` and the last ``Tw + 2`` valid positions. Of the remaining valid (eligible) keys, the
    top ``n = ceil(float32(kappa) * #eligible)`` by logit are kept, ties at the threshold included
    (``n = 0`` keeps none).

    ``tier="per_head"`` (reference behaviour): each query head ranks keys by its own logit.
    ``tier="per_layer"``: one key set per row shared by all heads of the layer, ranked by the
    maximum over query heads of the scaled logit (a key is as relevant as it is to the head that
    wants it most), so the shared set covers every head's strongest keys.
    """
    if tier not in ("per_head", "per_layer"):
        raise SoljaxError(f"unknown relevancy tier {tier!r} (expected 'per_head' or 'per_layer')")
    R, Hq, N = logits.shape
    kv = _rows(kv_len, jnp.int32)[:, None]
    pos = _rows(positions, jnp.int32)
    valid = (pos >= 0) & (pos < kv)
    always = pos < Ts
    if Tw >= 0:
        always = always | (pos >= kv - (Tw + 2))
    always = always & valid
    eligible = valid & ~always  # [R, N]
    n_elig = eligible.sum(axis=-1).astype(jnp.float32)
    n = jnp.ceil(_rows(kappa, jnp.float32) * n_elig).astype(jnp.int32)  # [R]
    scores = logits.astype(jnp.float32)
    scores = scores if tier == "per_head" else scores.max(axis=1, keepdims=True)
    masked = jnp.where(eligible[:, None, :], scores, -jnp.inf)
    k = jnp.broadcast_to(jnp.clip(n, 1, N)[:, None], masked.shape[:-1])
    chosen = top_k_mask(masked, k) & eligible[:, None, :] & (n > 0)[:, None, None]
    return jnp.broadcast_to(chosen | always[:, None, :], (R, Hq, N))


def relevancy_keep(q: jax.Array, k: jax.Array, kv_len: jax.Array, kappa: jax.Array, Ts: int,
                   Tw: int, tier: str = "per_head") -> jax.Array:
    """Relevancy keep mask ``[R, Hq, S]`` over a full cache ``k [R, S, Hkv, Dh]`` (logits
    ``q . k / sqrt(Dh)``; see :func:`relevancy_keep_logits`)."""
    R, Hq, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(R, Hkv, Hq // Hkv, Dh)
    logits = jnp.einsum("rkgd,rskd->rkgs", qg, k.astype(jnp.float32), precision=HIGHEST)
    logits = (logits * (1.0 / math.sqrt(Dh))).reshape(R, Hq, S)
    pos = jnp.broadcast_to(jnp.arange(S)[None, :], (R, S))
    return relevancy_keep_logits(logits, pos, kv_len, kappa, Ts, Tw, tier)


# ---------------------------------------------------------------------------------------- metrics


def attended_fraction(keep: jax.Array, kv_len: jax.Array) -> jax.Array:
    """Realized attended fraction per row: kept valid keys / kv_len, averaged over heads.

    ``keep [R, S]`` or ``[R, H, S]``; returns float32 ``[R]``.
    """
    kv = _rows(kv_len, jnp.int32)
    valid = jnp.arange(keep.shape[-1])[None, :] < kv[:, None]
    if keep.ndim == 3:
        valid = valid[:, None, :]
    frac = (keep & valid).sum(axis=-1).astype(jnp.float32) / jnp.maximum(kv, 1).astype(jnp.float32)[
        (slice(None),) + (None,) * (keep.ndim - 2)]
    return frac.mean(axis=1) if keep.ndim == 3 else frac
