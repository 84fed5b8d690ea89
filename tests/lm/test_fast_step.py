"""The fast decode step (static branches per action level, page gathers) equals the masked step:
same kept pages and keys, same channels and bits, logits within float32 summation order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.compress import attention as sparse
from soljax.compress.actions import ActionGrid
from soljax.errors import SoljaxError
from soljax.lm import LMConfig, init_params
from soljax.lm.controlled import Controls, SparsityConfig, SuffixCache, controlled_step, prefill_shared
from soljax.lm.fast_step import FastPath, Levels, fast_step, union_capacities

CFG = LMConfig(vocab_size=61, hidden_size=40, intermediate_size=48, num_layers=2, num_heads=6,
               num_kv_heads=2, head_dim=16)
PARAMS = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
M, T = 45, 5  # prefix of 43 real tokens: not a whole number of pages, so one page straddles
LENGTH = 43
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (1, M + T), 0, CFG.vocab_size)
SCFG = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1)
GRID = ActionGrid(keep_fracs=[0.1, 0.3, 1.0], struct_prune_choices=["s40", "s70", "s100"],
                  quant_choices=["q3", "q5", "q16"])


def _decode(step, controls_t):
    _, prefix = prefill_shared(CFG, SCFG, PARAMS, TOKENS[:, :M], jnp.array([LENGTH]))
    suffix = SuffixCache.empty(CFG, 1, 1, T)
    logits, kept = [], []
    for t in range(T):
        lg, _, suffix, info = step(prefix, suffix, TOKENS[:, LENGTH + t][:, None], controls_t[t])
        logits.append(lg)
        kept.append(info.kept_keys)
    return np.asarray(jnp.stack(logits)), np.asarray(jnp.stack(kept))


def _compare(controls_t, path):
    want, kept_want = _decode(lambda *a: controlled_step(CFG, SCFG, PARAMS, *a), controls_t)
    got, kept_got = _decode(lambda *a: fast_step(CFG, SCFG, path, PARAMS, *a), controls_t)
    np.testing.assert_array_equal(kept_got, kept_want)  # the same keys per head and layer
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    return kept_want


def _constant(kappa, rho, bits):
    c = Controls(kappa=jnp.full((1, 1), kappa, jnp.float32), rho=jnp.full((1, 1), rho, jnp.float32),
                 bits=jnp.full((1, 1), bits, jnp.int32))
    return [c] * T


@pytest.mark.parametrize("mlp", ["masked", "gather"])
def test_every_action_of_the_grid_matches_the_masked_step(mlp):
    path = FastPath(Levels.from_grid(GRID), mlp=mlp)
    skipped = False
    for a in range(GRID.num_actions):
        kept = _compare(_constant(GRID.kappa[a], GRID.rho[a], GRID.bits[a]), path)
        skipped |= bool((kept[-1] < LENGTH + T).any())
    assert skipped  # the sparse branches really attended fewer keys


def test_actions_changing_every_step_and_values_off_the_levels():
    rng = np.random.default_rng(0)
    path = FastPath(Levels.from_grid(GRID))
    mixed = [Controls(*(jnp.asarray(v).reshape(1, 1) for v in GRID.controls(rng.integers(GRID.num_actions))))
             for _ in range(T)]
    _compare(mixed, path)
    _compare(_constant(0.2, 0.55, 4), path)  # no level: the masked branch of each axis
    _compare([None] * T, path)  # no controls: dense


def test_page_selection_expands_to_the_masked_keep():
    rng = np.random.default_rng(1)
    B, K, Hq, Hkv, Dh, ps, Mc, Tn = 2, 3, 4, 2, 8, 4, 22, 6
    k = jnp.asarray(rng.normal(size=(B, Mc, Hkv, Dh)), jnp.float32)
    plen = jnp.array([22, 13])
    summ = tuple(a for a in sparse.page_summaries(k, plen, ps))
    q = jnp.asarray(rng.normal(size=(B, K, Hq, Dh)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(B, K, Tn, Hkv, Dh)), jnp.float32)
    kappa = jnp.asarray(rng.choice([0.1, 0.4, 1.0], (B, K)), jnp.float32)
    keep_p, keep_s = sparse.quest_keep_shared(q, summ, plen, ks, 4, kappa, ps, Mc)
    pages, keep_s2 = sparse.quest_pages_shared(q, summ, plen, ks, 4, kappa, ps)
    valid = (jnp.arange(Mc)[None, :] < plen[:, None])[:, None, None, :]
    expanded = jnp.repeat(pages, ps, axis=-1)[..., :Mc] & valid
    np.testing.assert_array_equal(np.asarray(expanded), np.asarray(keep_p & valid))
    np.testing.assert_array_equal(np.asarray(keep_s2), np.asarray(keep_s))


def test_levels_and_capacities():
    lv = Levels.from_grid(GRID)
    assert lv.keep == (float(np.float32(0.1)), float(np.float32(0.3)), 1.0) and lv.bits == (3, 5, 16)
    assert Levels.of(keep=[0.5]).rho == (1.0,) and Levels.of().bits == (16,)
    # budget 0.1 * 1000 keys = 100 keys = 13 pages of 8; a group of 3 holds at most 39
    assert union_capacities(0.1, 1000, 125, 8, 3) == (13, 20, 26, 39)
    assert union_capacities(0.5, 1000, 125, 8, 4)[-1] == 125  # capped at the prefix's pages
    with pytest.raises(SoljaxError, match="mlp"):
        FastPath(lv, mlp="sparse")
    with pytest.raises(SoljaxError, match="one schedule each"):
        _, prefix = prefill_shared(CFG, SCFG, PARAMS, TOKENS[:, :M], jnp.array([LENGTH]))
        fast_step(CFG, SCFG, FastPath(lv), PARAMS, prefix, SuffixCache.empty(CFG, 1, 2, T),
                  jnp.zeros((1, 2), jnp.int32), None)


ROW_TOKENS = jax.random.randint(jax.random.PRNGKey(2), (3, M + T), 0, CFG.vocab_size)
ROW_LENGTHS = jnp.array([LENGTH, 30, M])
# per step, each row's (kappa, rho, bits): one shared level per axis; different sparse levels
# (merged into the largest); dense and sparse rows mixed (the general branches); all dense; values
# off the levels
ROW_ACTIONS = [[(0.1, 0.4, 3)] * 3,
               [(0.1, 0.4, 3), (0.3, 0.7, 5), (0.3, 0.4, 3)],
               [(1.0, 1.0, 16), (0.1, 0.7, 16), (1.0, 0.4, 16)],
               [(1.0, 1.0, 16)] * 3,
               [(0.2, 0.55, 4), (0.1, 0.4, 5), (1.0, 1.0, 16)]]


@pytest.mark.parametrize("mlp", ["masked", "gather"])
def test_a_batch_of_rows_with_different_actions_matches_the_masked_step(mlp):
    path = FastPath(Levels.from_grid(GRID), mlp=mlp)
    rows = jnp.arange(3)

    def decode(step):
        _, prefix = prefill_shared(CFG, SCFG, PARAMS, ROW_TOKENS[:, :M], ROW_LENGTHS)
        suffix = SuffixCache.empty(CFG, 3, 1, T)
        logits, kept = [], []
        for t, actions in enumerate(ROW_ACTIONS):
            kappa, rho, bits = (jnp.asarray(v).reshape(3, 1) for v in zip(*actions))
            controls = Controls(kappa.astype(jnp.float32), rho.astype(jnp.float32), bits.astype(jnp.int32))
            lg, _, suffix, info = step(prefix, suffix, ROW_TOKENS[rows, ROW_LENGTHS + t][:, None], controls)
            logits.append(lg)
            kept.append(info.kept_keys)
        return np.asarray(jnp.stack(logits)), np.asarray(jnp.stack(kept))

    want, kept_want = decode(lambda *a: controlled_step(CFG, SCFG, PARAMS, *a))
    got, kept_got = decode(lambda *a: fast_step(CFG, SCFG, path, PARAMS, *a))
    np.testing.assert_array_equal(kept_got, kept_want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert (kept_want[1] < ROW_LENGTHS[None, :, None, None, None] + 2).any()  # sparse rows read fewer keys
