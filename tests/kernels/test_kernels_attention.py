"""QUEST page-sparse decode attention: each Pallas kernel against the pure-JAX reference.

``QuestAttentionCases`` holds the cases; each ``Test*`` subclass runs them for one kernel, natively
(skipped without that accelerator) or interpreted on CPU. Inputs are random (never zeros); keys and
values the attention must not use (past ``prefix_len``, unselected pages, unattended suffix slots)
are NaN, and the kernels' outputs start NaN-filled, so a read of the wrong data or an unwritten
element fails.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.errors import SoljaxError
from soljax.kernels import ops
from soljax.kernels.quest_attention import pages_from_keep, quest_decode_attention_reference

# (B, K, Hq, Hkv, Dh, M, T, page_size, prefix_len): ragged lengths, GQA ratios 1, 3 and 4, a partial
# last page, and a suffix longer than a page.
SHAPES = [
    (2, 3, 6, 2, 16, 40, 5, 4, (40, 23)),
    (1, 2, 4, 4, 32, 64, 3, 8, (57,)),
    (3, 1, 8, 2, 16, 29, 18, 4, (29, 1, 13)),
]


def make_case(shape, dtype, seed=0, capacity=None):
    """Random inputs of the contract for ``shape`` (numpy RNG: cheap), and the page size."""
    B, K, Hq, Hkv, Dh, M, T, ps, plen = shape
    P = -(-M // ps)
    G = Hq // Hkv
    rng = np.random.default_rng(seed)
    plen = np.array(plen, np.int32)
    keep = (rng.random((B, K, Hq, P)) < 0.35) & (np.arange(P) * ps < plen[:, None, None, None])
    smask = rng.random((B, K, Hq, T)) < 0.5
    smask[..., T - 1] = True  # the newest key: always attended
    pages, num, heads = pages_from_keep(jnp.asarray(keep), Hkv, capacity)
    # prefix keys/values: NaN past prefix_len and on pages no head of the group selected
    used = keep.reshape(B, K, Hkv, G, P).any(axis=(1, 3))  # [B, Hkv, P]
    slot_ok = np.repeat(used, ps, axis=-1)[..., :M].transpose(0, 2, 1)  # [B, M, Hkv]
    slot_ok = (slot_ok & (np.arange(M)[None, :, None] < plen[:, None, None]))[..., None]
    seen = smask.reshape(B, K, Hkv, G, T).any(3).transpose(0, 1, 3, 2)[..., None]  # [B, K, T, Hkv, 1]

    def rand(shape, ok):
        return jnp.asarray(np.where(ok, rng.standard_normal(shape), np.nan), dtype)

    q = jnp.asarray(rng.standard_normal((B, K, Hq, Dh)), dtype)
    args = (q, rand((B, M, Hkv, Dh), slot_ok), rand((B, M, Hkv, Dh), slot_ok), jnp.asarray(plen),
            rand((B, K, T, Hkv, Dh), seen), rand((B, K, T, Hkv, Dh), seen), jnp.asarray(smask), pages, num, heads)
    return args, ps


@functools.partial(jax.jit, static_argnums=1)
def dense_masked(args, ps):
    """Plain masked softmax attention over every key (independent of the page lists' encoding)."""
    q, kp, vp, plen, ksuf, vsuf, smask, pages, num, heads = args
    B, K, Hq, Dh = q.shape
    M, Hkv = kp.shape[1], kp.shape[2]
    G = Hq // Hkv
    NP = pages.shape[-1]
    used = jnp.arange(NP) < num[..., None]
    bits = (heads[..., None, :] >> jnp.arange(G)[:, None]) & 1  # [B, K, Hkv, G, NP]
    P = -(-M // ps)
    onehot = jax.nn.one_hot(jnp.where(used, pages, P), P + 1)[..., :P]  # [B, K, Hkv, NP, P]
    page_keep = jnp.einsum("bkhgn,bkhnp->bkhgp", (bits * used[..., None, :]).astype(jnp.float32), onehot) > 0
    mask_p = jnp.repeat(page_keep, ps, axis=-1)[..., :M] & (jnp.arange(M) < plen[:, None, None, None, None])
    qf = q.astype(jnp.float32).reshape(B, K, Hkv, G, Dh) / np.sqrt(Dh)
    lp = jnp.einsum("bkhgd,bmhd->bkhgm", qf, jnp.nan_to_num(kp.astype(jnp.float32)), precision="highest")
    ls = jnp.einsum("bkhgd,bkthd->bkhgt", qf, jnp.nan_to_num(ksuf.astype(jnp.float32)), precision="highest")
    ms = smask.reshape(B, K, Hkv, G, -1)
    probs = jax.nn.softmax(jnp.concatenate([jnp.where(mask_p, lp, -1e30), jnp.where(ms, ls, -1e30)], -1), -1)
    out = (jnp.einsum("bkhgm,bmhd->bkhgd", probs[..., :M], jnp.nan_to_num(vp.astype(jnp.float32)),
                      precision="highest")
           + jnp.einsum("bkhgt,bkthd->bkhgd", probs[..., M:], jnp.nan_to_num(vsuf.astype(jnp.float32)),
                        precision="highest"))
    return out.reshape(B, K, Hq, Dh)


def assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any(), "unwritten (NaN) output elements or NaN data read"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_reference_equals_dense_masked_attention():
    for i, shape in enumerate(SHAPES[::2]):  # GQA 3 and 4, ragged, partial pages
        args, ps = make_case(shape, jnp.float32, seed=i)
        assert_close(quest_decode_attention_reference(*args, page_size=ps), dense_masked(args, ps), 1e-5)


def test_pages_from_keep_lists_each_groups_union_in_order():
    keep = jnp.array([[[[1, 0, 1, 0], [0, 0, 1, 1]]]], bool)  # B=K=1, Hq=2 over one KV head
    pages, num, heads = pages_from_keep(keep, 1)
    assert num.tolist() == [[[3]]]
    assert pages[0, 0, 0, :3].tolist() == [0, 2, 3]
    assert heads[0, 0, 0].tolist() == [0b01, 0b11, 0b10, 0]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_page_lists_are_a_stable_sort_of_the_union(density):
    """Kept pages ascending, then the others ascending, cut or padded to the capacity: what a stable
    argsort of "not kept" gives (the lists are built without sorting)."""
    rng = np.random.default_rng(int(density * 10))
    for (B, K, Hq, P), hkv, cap in [((1, 1, 9, 500), 3, None), ((2, 3, 4, 37), 2, 10), ((1, 2, 2, 5), 1, 8)]:
        keep = rng.random((B, K, Hq, P)) < density
        union = keep.reshape(B, K, hkv, Hq // hkv, P).any(3)
        expect = np.argsort(~union, axis=-1, kind="stable")[..., :cap]
        pages, num, _ = pages_from_keep(jnp.asarray(keep), hkv, cap)
        np.testing.assert_array_equal(np.asarray(pages)[..., :P], expect)
        np.testing.assert_array_equal(np.asarray(num), np.minimum(union.sum(-1), cap or P))


class QuestAttentionCases:
    kernel = "gpu"
    interpret = False

    def setup_method(self):
        if not self.interpret and jax.default_backend() != self.kernel:
            pytest.skip(f"needs a {self.kernel.upper()}")

    def run(self, args, ps):
        return ops.quest_decode_attention(*args, page_size=ps, impl="pallas", interpret=self.interpret,
                                          kernel=self.kernel)

    @pytest.mark.parametrize("shape", SHAPES, ids=["gqa3-ragged", "mha", "gqa4-long-suffix"])
    def test_float32_matches_reference(self, shape):
        args, ps = make_case(shape, jnp.float32, seed=1)
        assert_close(self.run(args, ps), quest_decode_attention_reference(*args, page_size=ps), 1e-5)

    def test_bfloat16_matches_reference(self):
        args, ps = make_case(SHAPES[0], jnp.bfloat16, seed=2)
        got = self.run(args, ps)
        assert got.dtype == jnp.bfloat16
        assert_close(got, quest_decode_attention_reference(*args, page_size=ps), 1e-2)

    def test_a_capacity_larger_than_the_selection(self):
        args, ps = make_case(SHAPES[1], jnp.float32, seed=3, capacity=11)  # unused slots hold junk pages
        assert_close(self.run(args, ps), dense_masked(args, ps), 1e-5)


class SplitCases:
    """The Triton kernel's flash-decoding split: each (row, KV head)'s used page slots over
    ``num_splits`` programs, merged afterwards."""

    # keys_per_step=16 is 4 pages of 4 a step: SHAPES[0] rows use 3-9 of 10 slots, so 3 chunks of whole
    # steps come out full, short and empty; SHAPES[2] has a row with no pages (every chunk empty)
    @pytest.mark.parametrize("num_splits", [1, 3])
    @pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=["gqa3-ragged", "gqa4-long-suffix"])
    def test_split_pages_match_reference(self, shape, num_splits):
        from soljax.kernels.quest_attention_gpu import quest_decode_attention_gpu

        args, ps = make_case(shape, jnp.float32, seed=4)
        got = quest_decode_attention_gpu(*args, page_size=ps, interpret=self.interpret, keys_per_step=16,
                                         num_splits=num_splits)
        assert_close(got, quest_decode_attention_reference(*args, page_size=ps), 1e-5)


class TestQuestAttentionGpu(QuestAttentionCases, SplitCases):
    kernel = "gpu"


class TestQuestAttentionGpuInterpret(QuestAttentionCases, SplitCases):
    kernel = "gpu"
    interpret = True


class TestQuestAttentionCpu(QuestAttentionCases):
    """The C++ kernel (built on first use with the system's compiler)."""

    def setup_method(self):
        pass

    def run(self, args, ps):
        return ops.quest_decode_attention(*args, page_size=ps, impl="cpu")

    def test_bfloat16_matches_reference(self):  # float32 only: a clear error instead
        args, ps = make_case(SHAPES[0], jnp.bfloat16, seed=2)
        with pytest.raises(SoljaxError, match="float32"):
            self.run(args, ps)

    def test_a_missing_compiler_is_a_clear_error(self, tmp_path, monkeypatch):
        from soljax.kernels import native

        monkeypatch.setenv("SOLJAX_KERNEL_CACHE", str(tmp_path))  # nothing built there yet
        monkeypatch.setenv("CXX", "no-such-compiler")
        with pytest.raises(SoljaxError, match="C\\+\\+ compiler"):
            native.build("quest_attention_cpu.cc")

    def test_a_large_group_over_long_pages_matches_reference(self):
        """Eight query heads per KV head take the transposed-block loop, over pages longer than a
        block (two blocks per page, the second partial)."""
        args, ps = make_case((2, 1, 8, 1, 16, 90, 3, 40, (90, 57)), jnp.float32, seed=7)
        assert_close(self.run(args, ps), quest_decode_attention_reference(*args, page_size=ps), 1e-5)

    def test_stacked_layers_are_read_in_place_at_a_traced_layer(self):
        (q, k, v, *rest), ps = make_case(SHAPES[0], jnp.float32, seed=5)
        # [L, B, M, Hkv, Dh]: other values per layer, NaN (never to be read) in the same slots
        k_all, v_all = jnp.stack([k, 2.0 * k + 1.0, -k]), jnp.stack([v, v - 1.0, 3.0 * v])

        @jax.jit
        def each_layer(k_all, v_all):
            return jax.lax.map(lambda l: ops.quest_decode_attention(q, k_all, v_all, *rest, page_size=ps, impl="cpu",
                                                                    layer=l), jnp.arange(3))

        got = each_layer(k_all, v_all)
        for layer in range(3):
            want = quest_decode_attention_reference(q, k_all[layer], v_all[layer], *rest, page_size=ps)
            assert_close(got[layer], want, 1e-5)


@pytest.mark.parametrize("Hq, Hkv, Dh", [(6, 2, 16), (4, 4, 12), (8, 1, 64)])
def test_a_dense_extension_reads_every_cache_entry_once_for_all_queries(Hq, Hkv, Dh):
    """``dense_extend_attention_cpu`` (shared page lists: one pass over the cache for T queries)
    against float64 NumPy: rows of different cache lengths (one empty, one a full cache whose length
    is no multiple of the page), stacked layers read at a traced index, NaN past each row's length,
    padded queries that attend nothing get zeros; Dh off the vector width takes the scalar loops."""
    from soljax.kernels.quest_attention_cpu import dense_extend_attention_cpu

    rng = np.random.default_rng(Hq + Dh)
    L, B, M, T = 2, 3, 77, 5
    lengths, num_new = np.array([77, 0, 40]), np.array([5, 3, 1])
    k = rng.standard_normal((L, B, M, Hkv, Dh)).astype(np.float32)
    v = rng.standard_normal((L, B, M, Hkv, Dh)).astype(np.float32)
    past = np.arange(M)[None, :, None, None] >= lengths[:, None, None, None]
    k[:, past[..., 0, 0]], v[:, past[..., 0, 0]] = np.nan, np.nan
    q = rng.standard_normal((B, T, Hq, Dh)).astype(np.float32)
    kn, vn = (rng.standard_normal((B, T, Hkv, Dh)).astype(np.float32) for _ in range(2))
    causal = (np.arange(T)[None, :, None] >= np.arange(T)[None, None, :]) & (np.arange(T) < num_new[:, None, None])
    mask = np.broadcast_to(causal[:, :, None, :], (B, T, Hq, T)).copy()
    mask[1, 2:] = False  # padded queries of the empty row: nothing to attend

    got = jax.jit(lambda l: dense_extend_attention_cpu(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                       jnp.asarray(lengths, jnp.int32), jnp.asarray(kn),
                                                       jnp.asarray(vn), jnp.asarray(mask), layer=l))(1)
    G = Hq // Hkv
    want = np.zeros((B, T, Hq, Dh))
    for b in range(B):
        keys = np.concatenate([k[1, b, :lengths[b]], kn[b]]).astype(np.float64)  # [S + T, Hkv, Dh]
        vals = np.concatenate([v[1, b, :lengths[b]], vn[b]]).astype(np.float64)
        for t in range(T):
            for h in range(Hq):
                seen = np.concatenate([np.ones(lengths[b], bool), mask[b, t, h]])
                if not seen.any():
                    continue
                lg = keys[seen, h // G] @ q[b, t, h].astype(np.float64) / np.sqrt(Dh)
                p = np.exp(lg - lg.max())
                want[b, t, h] = p @ vals[seen, h // G] / p.sum()
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


def test_merge_partials_ignores_empty_chunks():
    from soljax.kernels.quest_attention import MASK_VALUE
    from soljax.kernels.quest_attention_gpu import merge_partials

    rng = np.random.default_rng(0)
    o = jnp.asarray(rng.standard_normal((3, 2, 4)), jnp.float32)  # [S, G, Dh]
    m = jnp.array([[1.0, MASK_VALUE], [MASK_VALUE, -jnp.inf], [3.0, MASK_VALUE]], jnp.float32)  # [S, G]
    l = jnp.array([[2.0, 0.0], [0.0, 0.0], [0.5, 0.0]], jnp.float32)
    o = o * (l > 0)[..., None]  # empty chunks hold a zero output
    got = np.asarray(merge_partials(o, m, l))
    w = np.exp(np.array([1.0, 3.0]) - 3.0)
    want0 = (w[0] * o[0, 0] + w[1] * o[2, 0]) / (w[0] * 2.0 + w[1] * 0.5)
    np.testing.assert_allclose(got[0], want0, rtol=1e-6)
    assert not np.isnan(got).any() and (got[1] == 0).all()  # a head with no keys: 0, not NaN


class TestQuestAttentionTpu(QuestAttentionCases):
    kernel = "tpu"


class TestQuestAttentionTpuInterpret(QuestAttentionCases):
    kernel = "tpu"
    interpret = True


def test_impl_selection_errors():
    args, ps = make_case(SHAPES[1], jnp.float32)
    with pytest.raises(SoljaxError, match="impl"):
        ops.quest_decode_attention(*args, page_size=ps, impl="triton")
    if jax.default_backend() == "cpu":
        with pytest.raises(SoljaxError, match="GPU or TPU"):
            ops.quest_decode_attention(*args, page_size=ps, impl="pallas")
