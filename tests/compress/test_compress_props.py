"""Properties of soljax.compress on random inputs (hypothesis draws seeds, lengths and controls).

Shapes are drawn from a few fixed sets so that each jitted function compiles a handful of times.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from soljax.compress import (
    attended_fraction, fake_quant, merge_page_summaries, page_summaries, prune_topk, quant_step, refresh_page_summaries,
    quest_keep, quest_keep_split, quest_page_budget, quest_scores, quest_token_budget,
    recency_keep, relevancy_keep, window_page_summaries,
)

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

R, HQ, HKV, DH, S = 4, 4, 2, 8, 40  # GQA groups of 2, capacity 40 (5 pages of 8, 10 of 4)

quest_jit = jax.jit(quest_keep, static_argnums=4)
prune_jit = jax.jit(prune_topk)
quant_jit = jax.jit(fake_quant)
recency_jit = jax.jit(recency_keep, static_argnums=(2, 3, 4))
relevancy_jit = jax.jit(relevancy_keep, static_argnums=(4, 5, 6))

seeds = st.integers(0, 2**31 - 1)
page_sizes = st.sampled_from([4, 8])
# 0 or a normal float32 (XLA on CPU flushes subnormals to zero)
kappas = st.one_of(st.just(0.0), st.floats(2.0**-20, 1.0, width=32))
rows_kv = st.lists(st.integers(1, S), min_size=R, max_size=R)
rows_kappa = st.lists(kappas, min_size=R, max_size=R)


def qk(seed, s=S):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((R, HQ, DH)).astype(np.float32)
    k = rng.standard_normal((R, s, HKV, DH)).astype(np.float32)
    return q, k


def np_quest(q, k, kv_len, kappa, page):
    """Straightforward per-row, per-head QUEST (float64 scores), plus the page budget used."""
    R_, Hq, _ = q.shape
    G = Hq // k.shape[2]
    keep = np.zeros((R_, Hq, k.shape[1]), bool)
    margins = []
    for r in range(R_):
        n = int(kv_len[r])
        n_tok = min(max(math.ceil(np.float32(kappa[r]) * np.float32(n)), 1), n)
        pages = [(j, min(j + page, n)) for j in range(0, n, page)]
        n_pg = min(-(-n_tok // page), len(pages))
        for h in range(Hq):
            kk = k[r, :n, h // G].astype(np.float64)
            qq = q[r, h].astype(np.float64)
            sc = np.array([np.maximum(qq * kk[a:b].max(0), qq * kk[a:b].min(0)).sum()
                           for a, b in pages])
            order = np.sort(sc)[::-1]
            thr = order[n_pg - 1]
            if n_pg < len(pages):
                margins.append((order[n_pg - 1] - order[n_pg]) / (abs(thr) + 1e-6))
            for (a, b), v in zip(pages, sc):
                if v >= thr:
                    keep[r, h, a:b] = True
    return keep, (min(margins) if margins else np.inf)


# --------------------------------------------------------------------------------------- QUEST


@SETTINGS
@given(seed=seeds, kv=rows_kv, kap=rows_kappa, page=page_sizes)
def test_quest_matches_numpy_reference(seed, kv, kap, page):
    q, k = qk(seed)
    kv, kap = np.asarray(kv, np.int32), np.asarray(kap, np.float32)
    ref, margin = np_quest(q, k, kv, kap, page)
    assume(margin > 1e-4)  # no near-ties between the last kept and the first dropped page
    np.testing.assert_array_equal(np.asarray(quest_jit(q, k, kv, kap, page)), ref)


@SETTINGS
@given(seed=seeds, kv=rows_kv, kap=rows_kappa, page=page_sizes)
def test_quest_realized_fraction(seed, kv, kap, page):
    """Distinct scores: exactly n_pg pages are kept, so the attended fraction is >= kappa unless
    the partial last page is among them (then it is short by at most page_size - 1 keys)."""
    q, k = qk(seed)
    kv, kap = np.asarray(kv, np.int32), np.asarray(kap, np.float32)
    keep = np.asarray(quest_jit(q, k, kv, kap, page))
    frac = np.asarray(attended_fraction(keep, kv))
    n_tok = np.asarray(quest_token_budget(kap, kv))
    _, _, valid = page_summaries(k, kv, page)
    n_pg = np.asarray(quest_page_budget(n_tok, page, valid.sum(-1)))
    for r in range(R):
        n = kv[r]
        assert n_tok[r] == min(max(math.ceil(np.float32(kap[r]) * np.float32(n)), 1), n)
        full = n // page * page
        for h in range(HQ):
            kept = keep[r, h]
            assert not kept[n:].any()
            pages_kept = [kept[a:a + page].any() for a in range(0, n, page)]
            assert sum(pages_kept) == n_pg[r]  # random normal data: scores are distinct
            if full == n or not kept[full:n].any():
                assert kept.sum() >= n_tok[r] >= kap[r] * n * (1 - 1e-6)
            else:
                assert kept.sum() >= n_tok[r] - (page - 1)
        np.testing.assert_allclose(frac[r], keep[r, :, :n].sum(-1).mean() / n, rtol=1e-6)


@SETTINGS
@given(seed=seeds, kv=rows_kv, k1=rows_kappa, k2=rows_kappa, page=page_sizes)
def test_quest_monotone_in_kappa(seed, kv, k1, k2, page):
    q, k = qk(seed)
    kv = np.asarray(kv, np.int32)
    lo = np.minimum(np.asarray(k1, np.float32), np.asarray(k2, np.float32))
    hi = np.maximum(np.asarray(k1, np.float32), np.asarray(k2, np.float32))
    keep_lo = np.asarray(quest_jit(q, k, kv, lo, page))
    keep_hi = np.asarray(quest_jit(q, k, kv, hi, page))
    assert not (keep_lo & ~keep_hi).any()


@SETTINGS
@given(seed=seeds, kv=rows_kv, page=page_sizes)
def test_quest_kappa_one_is_dense(seed, kv, page):
    q, k = qk(seed)
    kv = np.asarray(kv, np.int32)
    keep = np.asarray(quest_jit(q, k, kv, np.ones(R, np.float32), page))
    valid = np.arange(S)[None, None, :] < kv[:, None, None]
    np.testing.assert_array_equal(keep, np.broadcast_to(valid, keep.shape))


def test_quest_fallback_keeps_newest_key():
    q, k = qk(0)
    q[1] = np.nan  # NaN scores: no page passes the threshold
    kv = np.asarray([20, 17, 40, 5], np.int32)
    keep = np.asarray(quest_jit(q, k, kv, np.full(R, 0.2, np.float32), 8))
    assert (keep[1].sum(-1) == 1).all() and keep[1, :, 16].all()
    assert (keep[0].sum(-1) == 8).all()


SP, T = 24, 6  # prefix capacity and suffix length for the split tests


def split_case(seed, plen, slen):
    rng = np.random.default_rng(seed)
    kp = rng.standard_normal((R, SP, HKV, DH)).astype(np.float32)
    ks = rng.standard_normal((R, T, HKV, DH)).astype(np.float32)
    q = rng.standard_normal((R, HQ, DH)).astype(np.float32)
    full = np.zeros((R, SP + T, HKV, DH), np.float32)
    for r in range(R):
        full[r, :plen[r]] = kp[r, :plen[r]]
        full[r, plen[r]:plen[r] + slen[r]] = ks[r, :slen[r]]
    return q, kp, ks, full


split_lens = st.lists(st.tuples(st.integers(1, SP), st.integers(1, T)), min_size=R, max_size=R)


@SETTINGS
@given(seed=seeds, lens=split_lens, page=page_sizes, with_prefix=st.booleans())
def test_merged_summaries_equal_concatenated(seed, lens, page, with_prefix):
    plen = np.asarray([a for a, _ in lens], np.int32)
    slen = np.asarray([b for _, b in lens], np.int32)
    q, kp, ks, full = split_case(seed, plen, slen)
    prefix = page_summaries(kp, plen, page)
    wmax, wmin, wvalid, first = window_page_summaries(ks, plen, slen, page,
                                                      prefix=prefix if with_prefix else None)
    np.testing.assert_array_equal(first, plen // page)
    n_pages = -(-(SP + T) // page)
    merged = merge_page_summaries(prefix, (wmax, wmin, wvalid), first, num_pages=n_pages)
    expect = page_summaries(full, plen + slen, page)
    for a, b in zip(merged, expect):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@SETTINGS
@given(seed=seeds, lens=split_lens, page=page_sizes)
def test_refreshed_summaries_equal_a_full_summary(seed, lens, page):
    # rows of ``full`` take their suffix keys at positions [plen, plen + slen): refreshing the prefix's
    # summaries where they were written gives the summaries of the whole cache, up to its last page
    plen = np.asarray([a for a, _ in lens], np.int32)
    slen = np.asarray([b for _, b in lens], np.int32)
    _, _, _, full = split_case(seed, plen, slen)
    before = np.where((np.arange(SP + T) < plen[:, None])[:, :, None, None], full, 0.0)
    kmax, kmin, _ = page_summaries(before, plen, page)
    got = refresh_page_summaries(kmax, kmin, full, plen, plen + slen, T, page)
    expect = page_summaries(full, plen + slen, page)
    for a, b in zip(got, expect[:2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@SETTINGS
@given(seed=seeds, lens=split_lens, kap=rows_kappa, page=page_sizes)
def test_quest_split_equals_concatenated(seed, lens, kap, page):
    plen = np.asarray([a for a, _ in lens], np.int32)
    slen = np.asarray([b for _, b in lens], np.int32)
    kap = np.asarray(kap, np.float32)
    q, kp, ks, full = split_case(seed, plen, slen)
    prefix = page_summaries(kp, plen, page)
    keep_p, keep_s = jax.jit(quest_keep_split, static_argnums=6)(q, prefix, ks, plen, slen, kap, page)
    keep_p, keep_s = np.asarray(keep_p), np.asarray(keep_s)
    ref = np.asarray(quest_jit(q, full, plen + slen, kap, page))
    for r in range(R):
        P0 = plen[r]
        np.testing.assert_array_equal(keep_p[r, :, :P0], ref[r, :, :P0])
        assert not keep_p[r, :, P0:].any()
        np.testing.assert_array_equal(keep_s[r, :, :slen[r]], ref[r, :, P0:P0 + slen[r]])
        assert not keep_s[r, :, slen[r]:].any()


def test_quest_scores_extra_axes_share_prefix():
    """Queries of several schedules score one row's shared summaries like separate rows."""
    q, k = qk(3)
    kv = np.asarray([40, 33, 9, 17], np.int32)
    kmax, kmin, valid = page_summaries(k, kv, 8)
    qs = np.stack([q, q[::-1]], axis=1)  # [R, 2, Hq, Dh]
    both = np.asarray(quest_scores(qs, kmax, kmin, valid))
    np.testing.assert_array_equal(both[:, 0], np.asarray(quest_scores(q, kmax, kmin, valid)))
    np.testing.assert_array_equal(both[:, 1], np.asarray(quest_scores(q[::-1], kmax, kmin, valid)))


# ------------------------------------------------------------------------------ pruning, quant

D = 48


@SETTINGS
@given(seed=seeds, rho=rows_kappa)
def test_prune_keeps_exact_topk(seed, rho):
    x = np.random.default_rng(seed).standard_normal((R, D)).astype(np.float32)
    rho = np.asarray(rho, np.float32)
    out = np.asarray(prune_jit(x, rho))
    for r in range(R):
        k = min(max(math.ceil(np.float32(rho[r]) * np.float32(D)), 1), D)
        top = np.argsort(-np.abs(x[r]))[:k]
        expect = np.zeros(D, np.float32)
        expect[top] = x[r, top]
        np.testing.assert_array_equal(out[r], expect)
        assert (out[r] != 0).sum() == k


def test_prune_ties_keep_more_and_rho_one_is_identity():
    x = np.asarray([[3.0, -3.0, 1.0, 3.0, 0.5, -2.0]], np.float32)
    out = np.asarray(prune_topk(x, np.asarray([0.2], np.float32)))  # k = 2, three tied at 3
    np.testing.assert_array_equal(out, [[3.0, -3.0, 0.0, 3.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(prune_topk(x, np.ones(1, np.float32))), x)


bits_rows = st.lists(st.integers(2, 16), min_size=R, max_size=R)


@SETTINGS
@given(seed=seeds, bits=bits_rows, scale=st.floats(1e-3, 1e3))
def test_fake_quant_properties(seed, bits, scale):
    x = (np.random.default_rng(seed).standard_normal((R, 2, D)) * scale).astype(np.float32)
    b = np.asarray(bits, np.int32)
    y = np.asarray(quant_jit(x, b))
    s = np.asarray(quant_step(x, b))
    q16 = b >= 16
    np.testing.assert_array_equal(y[q16], x[q16])  # identity
    lo = ~q16
    # sign preserving (zeros may appear)
    assert (y[lo] * x[lo] >= 0).all()
    # error at most half a step (+ float32 rounding of x / s and code * s, relative to |x|)
    eps = np.finfo(np.float32).eps
    assert (np.abs(y[lo] - x[lo]) <= s[lo] * 0.5 + 4 * eps * np.abs(x[lo])).all()
    # at most 2^b - 1 levels per vector, all integer multiples of the step
    codes = y[lo] / s[lo]
    np.testing.assert_allclose(codes, np.round(codes), rtol=1e-6, atol=1e-3)
    # idempotent: the same integer codes, values equal up to rounding of the re-derived scale
    yy = np.asarray(quant_jit(y, b))
    np.testing.assert_array_equal(np.round(yy[lo] / s[lo]), np.round(codes))
    np.testing.assert_allclose(yy, y, rtol=0, atol=float(np.abs(x).max()) * 2e-6)


def test_fake_quant_rounds_half_to_even_and_handles_zeros():
    # bits 3: qmax 3; max |x| = 3 -> step 1; 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    x = np.asarray([[0.5, 1.5, -2.5, 3.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(fake_quant(x, np.asarray([3]))), [[0.0, 2.0, -2.0, 3.0]])
    z = np.zeros((1, 8), np.float32)
    np.testing.assert_array_equal(np.asarray(fake_quant(z, np.asarray([4]))), z)
    xb = jnp.asarray(x, jnp.bfloat16)
    assert fake_quant(xb, np.asarray([3])).dtype == jnp.bfloat16
    assert fake_quant(xb, np.asarray([16])) is not None


# ------------------------------------------------------------------------ recency, relevancy


def np_recency(n, kappa, Ts, Tw):
    keep = np.zeros(S, bool)
    if n <= Ts + Tw + 1:
        keep[:n] = True
        return keep
    ke = math.ceil(np.float32(kappa) * np.float32(n - (Ts + Tw + 1)))
    keep[:Ts] = True
    keep[max(Ts, n - (Tw + 1 + ke)):n] = True
    return keep


@SETTINGS
@given(kv=rows_kv, kap=rows_kappa, Ts=st.sampled_from([0, 4]), Tw=st.sampled_from([0, 2]))
def test_recency_matches_rule(kv, kap, Ts, Tw):
    kv, kap = np.asarray(kv, np.int32), np.asarray(kap, np.float32)
    keep = np.asarray(recency_jit(kv, kap, S, Ts, Tw))
    for r in range(R):
        np.testing.assert_array_equal(keep[r], np_recency(kv[r], kap[r], Ts, Tw))


def np_relevancy(q, k, n, kappa, Ts, Tw, tier):
    G = q.shape[0] // k.shape[1]
    logits = np.stack([k[:, h // G] @ q[h] for h in range(q.shape[0])]) / math.sqrt(q.shape[1])
    if tier == "per_layer":
        logits = np.broadcast_to(logits.max(0), logits.shape)
    always = np.zeros(S, bool)
    always[:min(Ts, n)] = True
    always[max(n - (Tw + 2), 0):n] = True
    elig = np.zeros(S, bool)
    elig[:n] = True
    elig &= ~always
    m = math.ceil(np.float32(kappa) * np.float32(elig.sum()))
    keep = np.broadcast_to(always, logits.shape).copy()
    if m > 0:
        for h in range(q.shape[0]):
            idx = np.flatnonzero(elig)
            top = idx[np.argsort(-logits[h, idx], kind="stable")[:m]]
            keep[h, top] = True
    return keep


@SETTINGS
@given(seed=seeds, kv=rows_kv, kap=rows_kappa, tier=st.sampled_from(["per_head", "per_layer"]))
def test_relevancy_matches_rule(seed, kv, kap, tier):
    q, k = qk(seed)
    kv, kap = np.asarray(kv, np.int32), np.asarray(kap, np.float32)
    keep = np.asarray(relevancy_jit(q, k, kv, kap, 4, 2, tier))
    for r in range(R):
        np.testing.assert_array_equal(keep[r], np_relevancy(q[r], k[r], kv[r], kap[r], 4, 2, tier))
    if tier == "per_layer":
        assert (keep == keep[:, :1]).all()


# --------------------------------------------------------------------- per-row controls = rows alone


@SETTINGS
@given(seed=seeds, kv=rows_kv, kap=rows_kappa, rho=rows_kappa, bits=bits_rows, page=page_sizes)
def test_mixed_rows_equal_rows_alone(seed, kv, kap, rho, bits, page):
    q, k = qk(seed)
    kv, kap = np.asarray(kv, np.int32), np.asarray(kap, np.float32)
    rho, bits = np.asarray(rho, np.float32), np.asarray(bits, np.int32)
    x = np.random.default_rng(seed + 1).standard_normal((R, 1, D)).astype(np.float32)
    batch = [np.asarray(quest_jit(q, k, kv, kap, page)), np.asarray(prune_jit(x, rho)),
             np.asarray(quant_jit(x, bits)), np.asarray(recency_jit(kv, kap, S, 4, 2)),
             np.asarray(relevancy_jit(q, k, kv, kap, 4, 2, "per_head"))]
    for r in range(R):
        sl = slice(r, r + 1)
        alone = [quest_jit(q[sl], k[sl], kv[sl], kap[sl], page), prune_jit(x[sl], rho[sl]),
                 quant_jit(x[sl], bits[sl]), recency_jit(kv[sl], kap[sl], S, 4, 2),
                 relevancy_jit(q[sl], k[sl], kv[sl], kap[sl], 4, 2, "per_head")]
        for b, a in zip(batch, alone):
            np.testing.assert_array_equal(b[sl], np.asarray(a))
