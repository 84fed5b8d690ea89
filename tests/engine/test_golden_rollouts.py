"""Agreement with the reference implementation's rollouts on the embedded model.

The golden numbers live in ``tests/fixtures/golden`` (see its README). Schedules a (dense), b (QUEST
keep 0.3) and c (pruning 0.6) are matched step by step. Quantized schedules (d, e, f) are chaotic:
a last-bit difference (summation order, batch composition, the CPU's vector width) flips single
5-6-bit rounding decisions and the flip cascades through later layers and steps, so one block's
log-probs are not reproducible across machines or program shapes, not even inside the reference
(up to 3.2 nats on one step when only its batching changes). They are matched on the statistics that
are stable: means over the reference's 8 blocks x 16 steps.

How the bounds were derived (``scripts/golden_spread.py``): the 8 golden blocks were scored under 8
program shapes (one 8-row batch, permuted and reversed rows, batches of 1, 2 and 4 rows, one schedule
per batch, the quantized schedules alone) and 3 CPU code generations (native AVX2,
``XLA_FLAGS=--xla_cpu_max_isa=AVX`` and ``=SSE4_2``): 24 values per statistic. The standard deviation
over those 24 was sigma = 0.0071 / 0.0227 / 0.0363 nats for d / e / f (largest: 0.036), 0.0137 for
the mean over d, e and f together, 0.004 for c, and below 1e-5 for a and b. The reference's value is
one draw of the same chaotic statistic, so ``ours - reference`` has a standard deviation of
sqrt(2) sigma; every bound is 4 sqrt(2) sigma of its statistic, rounded up.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from golden import HIDDEN, M, NAMES, QUANTIZED, REF, SCFG, schedules

from soljax.compress.attention import quest_page_budget, quest_token_budget
from soljax.eval.schedules import run_schedules

AGG = REF["aggregate_8blocks"]["schedules"]
BOUND_POOLED = 0.08  # 4 sqrt(2) x 0.0137: the mean over d, e, f, 8 blocks and 16 steps
BOUND_QUANTIZED = 0.21  # 4 sqrt(2) x 0.0363: one quantized schedule's mean over 8 blocks x 16 steps
BOUND_PRUNED = 0.025  # 4 sqrt(2) x 0.004: c's mean over 8 blocks x 16 steps
BOUND_EXACT = 1e-3  # a and b: the per-step tolerance


@pytest.fixture(scope="module")
def one_block(embedded_model):
    cfg, params, _ = embedded_model
    return run_schedules(cfg, SCFG, params, jnp.array([REF["blocks"][0]["token_ids"]]), *schedules(), M)


@pytest.fixture(scope="module")
def eight_blocks(embedded_model):
    cfg, params, _ = embedded_model
    return run_schedules(cfg, SCFG, params, jnp.array(REF["aggregate_8blocks"]["token_ids"]), *schedules(), M)


def _ref(name):
    return REF["results"][name]["per_block"][0]


@pytest.mark.embedded
@pytest.mark.parametrize("name", ["a_dense", "b_keep0.3"])
def test_dense_and_token_sparse_match_per_step(one_block, name):
    i = NAMES.index(name)
    np.testing.assert_allclose(one_block.logprobs[0, i], _ref(name)["lp_gt"], atol=1e-3, rtol=0)
    h_norm = np.linalg.norm(np.asarray(one_block.hidden[0, i]), axis=-1)
    np.testing.assert_allclose(h_norm, _ref(name)["h_norm"], rtol=1e-4)
    np.testing.assert_allclose(one_block.hidden[0, i], HIDDEN[f"h_{name}"][0], atol=2e-3)


@pytest.mark.embedded
def test_quest_keeps_the_same_keys_per_layer_step_and_head(one_block):
    i = NAMES.index("b_keep0.3")
    ours = np.asarray(one_block.kept_keys[0, i])  # [T, L, Hq]
    ref = HIDDEN["questkept_b_keep0.3"][:, :, 0, :].transpose(1, 0, 2)  # [L, T, 1, Hq] -> [T, L, Hq]
    agree = (ours == ref).mean()
    assert agree >= 0.995, f"only {agree:.4f} of (step, layer, head) kept-key counts agree"
    np.testing.assert_allclose(one_block.attended[0, i], _ref("b_keep0.3")["quest_kept_frac_mean"], atol=2e-3)


@pytest.mark.embedded
def test_pruning_matches_per_step_up_to_rare_small_flips(one_block):
    i = NAMES.index("c_prune0.6")
    diff = np.abs(np.asarray(one_block.logprobs[0, i]) - np.array(_ref("c_prune0.6")["lp_gt"]))
    assert diff.max() <= 0.05
    assert (diff > 1e-3).sum() <= 3, diff


@pytest.mark.embedded
@pytest.mark.parametrize("name", NAMES)
def test_budgets_are_exact_and_attended_fraction_tracks_the_reference(one_block, name):
    ref = _ref(name)
    kv_len = np.array(ref["kv_len"])
    np.testing.assert_array_equal(kv_len, M + 1 + np.arange(len(kv_len)))
    n_tok = quest_token_budget(jnp.array(ref["kappa"], jnp.float32), jnp.array(kv_len))
    np.testing.assert_array_equal(n_tok, ref["tok_budget"])
    n_pages = -(-kv_len // SCFG.page_size)
    np.testing.assert_array_equal(quest_page_budget(n_tok, SCFG.page_size, jnp.array(n_pages)),
                                  ref["page_budget"])
    i = NAMES.index(name)
    got = np.asarray(one_block.attended[0, i])
    assert got[0] == pytest.approx(ref["quest_kept_frac_mean"][0], abs=1e-6)  # same keys at step 0
    np.testing.assert_allclose(got, ref["quest_kept_frac_mean"], atol=0.01)


def _mean_lp(scores, names):
    return float(np.mean([np.asarray(scores.logprobs[:, NAMES.index(n)]).mean() for n in names]))


def _ref_mean_lp(names):
    return float(np.mean([AGG[n]["mean_lp_8row_batch"] for n in names]))


@pytest.mark.embedded
def test_quantized_schedules_match_in_the_mean_over_blocks_and_schedules(eight_blocks):
    pooled = abs(_mean_lp(eight_blocks, QUANTIZED) - _ref_mean_lp(QUANTIZED))
    assert pooled <= BOUND_POOLED, f"mean over d, e, f differs by {pooled:.4f} nats"
    for name in QUANTIZED:
        diff = abs(_mean_lp(eight_blocks, [name]) - _ref_mean_lp([name]))
        assert diff <= BOUND_QUANTIZED, f"{name}: 8-block mean differs by {diff:.4f} nats"


@pytest.mark.embedded
def test_unquantized_schedules_match_in_the_mean_over_blocks(eight_blocks):
    for name, bound in (("a_dense", BOUND_EXACT), ("b_keep0.3", BOUND_EXACT), ("c_prune0.6", BOUND_PRUNED)):
        diff = abs(_mean_lp(eight_blocks, [name]) - _ref_mean_lp([name]))
        assert diff <= bound, f"{name}: 8-block mean differs by {diff:.4f} nats"


def test_the_reference_is_itself_chaotic_under_batching():
    """The README's "up to 3.2 nats on one step": the reference's own 8-row vs 1-row batches."""
    worst = max(AGG[name]["max_abs_step_diff"] for name in QUANTIZED)
    assert round(worst, 1) == 3.2
    assert max(AGG[name]["max_abs_step_diff"] for name in NAMES if name not in QUANTIZED) < 0.03
