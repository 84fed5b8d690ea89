"""Policy generation and scoring on the fast decode path, one prompt or a small batch, equal the
masked path."""

import dataclasses

import jax
import numpy as np

from conftest import tiny_lm
from soljax.compress.actions import ActionGrid
from soljax.control import PolicyController
from soljax.control.network import PolicyConfig, init_policy
from soljax.engine.episodes import MAX_FAST_BATCH, ControlledModel
from soljax.lm.controlled import SparsityConfig
from soljax.lm.fast_step import FastPath, Levels
from soljax.serve.generate import controlled_generate, score_continuations

CFG, PARAMS = tiny_lm(0, scale=0.5)
T = 4
SCFG = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1)
GRID = ActionGrid(keep_fracs=(0.1, 1.0), struct_prune_choices=("s60", "s100"), quant_choices=("q5", "q16"))
PCFG = PolicyConfig(d_model=32, n_heads=2, max_len=8)
VARIABLES = init_policy(PCFG, GRID.num_actions, 32, 32, jax.random.PRNGKey(1))
MASKED = ControlledModel(CFG, PARAMS, SCFG, PolicyController(grid=GRID, policy=PCFG, greedy=True), VARIABLES, T)
FAST = dataclasses.replace(MASKED, fast=FastPath(Levels.from_grid(GRID)))
TARGETS = (0.3, 0.6, 0.5)
PROMPT = [(7 * i + 3) % 97 for i in range(37)]


def test_fast_generation_equals_the_masked_generation():
    assert FAST.fast_for(1) is FAST.fast and FAST.fast_for(MAX_FAST_BATCH) is FAST.fast
    assert FAST.fast_for(MAX_FAST_BATCH + 1) is None and MASKED.fast_for(1) is None
    (want,) = controlled_generate(MASKED, [PROMPT], 10, TARGETS)
    (got,) = controlled_generate(FAST, [PROMPT], 10, TARGETS)
    assert (want.usage[want.effective] < 1).any()  # the policy really compresses
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.actions, want.actions)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
    np.testing.assert_allclose(got.attended, want.attended, atol=1e-6)
    cont = [5, 9, 3, 1, 2, 8, 8]
    (want,) = score_continuations(MASKED, [PROMPT], [cont], TARGETS)
    (got,) = score_continuations(FAST, [PROMPT], [cont], TARGETS)
    np.testing.assert_array_equal(got.actions, want.actions)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)


def test_a_batch_of_prompts_of_different_lengths_on_the_fast_path_equals_the_masked_path():
    prompts = [PROMPT, PROMPT[5:28], [(3 * i + 1) % 97 for i in range(31)]]
    want = controlled_generate(MASKED, prompts, 10, TARGETS)
    got = controlled_generate(FAST, prompts, 10, TARGETS)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        np.testing.assert_array_equal(g.actions, w.actions)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=2e-5)
    assert any((w.usage[w.effective] < 1).any() for w in want)


def test_compare_dense_reports_both_timings():
    from soljax.serve.generate import format_generation_report, policy_generation_report

    class Words:  # token ids as words
        def encode(self, text):
            return [int(w) for w in text.split()]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    prompt = " ".join(map(str, PROMPT))
    report = policy_generation_report(FAST, Words(), [prompt], 6, TARGETS, compare_dense=True)
    tm = report["timing"]
    assert tm["path"] == "fast" and tm["controlled_ms_per_token"] > 0 and tm["dense_ms_per_token"] > 0
    assert tm["speedup"] == tm["dense_ms_per_token"] / tm["controlled_ms_per_token"]
    assert "time per token: controlled" in format_generation_report(report)
    assert "timing" not in policy_generation_report(FAST, Words(), [prompt], 6, TARGETS)
