"""Evaluation: EMC/DAC keep targets reachable, the perplexity sweep's baselines and report."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_lm
from soljax.control.budget import axis_levels
from soljax.cli import main
from soljax.compress.actions import ActionGrid
from soljax.config import TrainConfig
from soljax.control import PolicyController, within_budget
from soljax.errors import SoljaxError
from soljax.compress.targets import parse_targets
from soljax.eval.sweep import Sweep, SweepConfig, default_static, default_targets
from soljax.plots import pareto_front
from soljax.control.heuristics import DriftController, EntropyMarginController, guarded_choice
from soljax.lm import model as lm
from soljax.control.network import init_policy
from soljax.eval.report import load_sweep, markdown
from soljax.engine import episode_usage, rollout
from soljax.config import action_grid, policy_config, sparsity_config

LM_CFG, LM_PARAMS = tiny_lm()
LM = (LM_CFG, LM_PARAMS, None)
M, T = 16, 8
CFG = TrainConfig.load(None, [f"context_len={M}", f"rollout_len={T}", "policy_d_model=32", "policy_n_heads=2",
                              "policy_max_len=8", "quest_page_size=4", "Ts=1", "Tw=1", "keep_fracs=[0.1,0.5,1.0]",
                              "struct_prune_choices=[s60,s100]", "quant_choices=[q5,q8,q16]"])
GRID = action_grid(CFG)
BLOCKS = np.random.default_rng(0).integers(0, 97, (6, M + T + 1))
STEP = np.array([max(np.diff(np.sort(lv))) for lv in axis_levels(GRID)])  # largest gap between levels


def test_guarded_choice_follows_the_signal_and_the_guard():
    levels = np.array([0.1, 0.5, 1.0])
    kw = dict(usage_sum=jnp.zeros(2), count=jnp.zeros(2), remaining=jnp.full(2, 4))
    # c_req = 0.3 sits midway between 0.1 and 0.5: the signal decides
    got = guarded_choice(levels, jnp.full(2, 0.3), u=jnp.array([0.9, 0.1]), gamma=0.35, **kw)
    assert got.tolist() == [1, 0]
    # after three steps at 0.1 a target of 0.5 needs 1.7 from the last step: unreachable, so the
    # guard must have forced a higher level one step earlier (needing 1.3 from 2 steps -> upper)
    got = guarded_choice(levels, jnp.full(1, 0.55), jnp.full(1, 0.2), jnp.full(1, 2.0), jnp.full(1, 2), jnp.zeros(1),
                         0.35)
    assert got.tolist() == [2]


@pytest.mark.parametrize("name", ["emc", "dac"])
def test_heuristics_keep_the_target_reachable_and_end_within_one_grid_step(name):
    B, K = 6, 1
    targets = np.random.default_rng(1).uniform([0.1, 0.6, 5 / 16], [1.0, 1.0, 1.0], (B, 3)).astype(np.float32)
    ctrl = (EntropyMarginController(grid=GRID, gamma=0.9) if name == "emc"
            else DriftController(grid=GRID, gamma=0.9, hidden_size=LM_CFG.hidden_size))
    traj = rollout(LM_CFG, sparsity_config(CFG), LM[1], jnp.asarray(BLOCKS), jnp.asarray(targets), ctrl, (),
                   jax.random.PRNGKey(0), context_len=M, schedules=K)
    usage = np.asarray(traj.usage)[:, 0]  # [B, T, 3], every step is effective here
    assert np.asarray(traj.effective).all()
    lo = np.array([lv.min() for lv in axis_levels(GRID)])
    hi = np.array([lv.max() for lv in axis_levels(GRID)])
    for t in range(1, T):  # what the remaining steps must average stays within the grid's range
        need = (targets * T - usage[:, :t].sum(1)) / (T - t)
        assert ((need >= lo - 1e-5) & (need <= hi + 1e-5)).all(), (t, need)
    gap = np.abs(usage.mean(1) - targets)
    assert (gap <= STEP / T + 1e-5).all()
    assert len(np.unique(np.asarray(traj.actions))) > 3  # it does allocate


def test_within_budget_keeps_the_cheapest_finish_possible():
    grid = ActionGrid(keep_fracs=[0.1, 0.5, 1.0])
    # target 0.3 over 4 steps with nothing spent: 0.3 * 4 - 3 * 0.1 = 0.9 is left for this step
    ok = within_budget(grid, jnp.array([0.3, 1.0, 1.0]), jnp.zeros(3), jnp.zeros(()), 4)
    assert np.asarray(ok).tolist() == [True, True, False]
    # overspent already: only the cheapest level remains
    ok = within_budget(grid, jnp.array([0.3, 1.0, 1.0]), jnp.array([2.0, 2.0, 2.0]), jnp.full((), 2.0), 2)
    assert np.asarray(ok).tolist() == [True, False, False]


def _dense_loving_policy():
    """A policy that prefers the dense action by a wide margin (so it overspends any target)."""
    pol = init_policy(policy_config(CFG), GRID.num_actions, 32, 32, jax.random.PRNGKey(1))
    bias = pol["params"]["pi_head"]["bias"]
    pol["params"]["pi_head"]["bias"] = bias.at[GRID.dense_idx].add(20.0)
    return pol


def test_guarded_policy_never_exceeds_its_targets_and_is_unchanged_without_a_cap():
    B = len(BLOCKS)
    pol = _dense_loving_policy()
    targets = np.random.default_rng(2).uniform([0.1, 0.6, 5 / 16], [0.9, 0.95, 0.9], (B, 3)).astype(np.float32)
    lowest = np.array([lv.min() for lv in axis_levels(GRID)])

    def run(guard, tgt, greedy=True):
        ctrl = PolicyController(grid=GRID, policy=policy_config(CFG), greedy=greedy, guard=guard)
        traj = rollout(LM_CFG, sparsity_config(CFG), LM[1], jnp.asarray(BLOCKS), jnp.asarray(tgt), ctrl, pol,
                       jax.random.PRNGKey(3), context_len=M, schedules=2)
        return traj, np.asarray(episode_usage(traj.usage, traj.effective))  # [B, K, 3]

    _, free = run(False, targets)
    assert (free > targets[:, None] + 0.05).any()  # unguarded, it overspends
    for greedy in (True, False):
        traj, capped = run(True, targets, greedy)
        assert (capped <= np.maximum(targets, lowest)[:, None] + 1e-5).all()
        assert np.isfinite(np.asarray(traj.logp_actions)).all()
    # the guard only removes actions: with nothing to cap, the policy acts as before
    ones = np.ones((B, 3), np.float32)
    a, _ = run(False, ones)
    b, _ = run(True, ones)
    np.testing.assert_array_equal(np.asarray(a.actions), np.asarray(b.actions))
    np.testing.assert_allclose(np.asarray(a.logp_actions), np.asarray(b.logp_actions), atol=1e-6)


@pytest.fixture(scope="module")
def sweep():
    pol = init_policy(policy_config(CFG), GRID.num_actions, 32, 32, jax.random.PRNGKey(1))
    sc = SweepConfig(num_blocks=6, batch_size=4, random_trials=3, targets=((0.3, 0.7, 0.5), (0.8, 0.9, 0.8)))
    return Sweep(LM, CFG, pol, sc).run(BLOCKS, progress=False)


def test_sweep_points_and_matched_baselines(sweep):
    pts = sweep["points"]
    methods = [p["method"] for p in pts]
    for m in ("policy", "fixed", "random_best_of_3", "random_mean", "emc", "dac", "dense", "quest@0.1",
              "teal@0.6", "zeroquant@5"):
        assert m in methods, m
    for s in (0, 1):
        by = {p["method"]: p for p in pts if p["sweep"] == s}
        pol = by["policy"]
        assert pol["blocks"] == 6 and len(pol["block_nll"]) == 6
        matched = np.array([pol["usage"][a] for a in ("token", "prune", "quant")])
        for m in ("fixed", "random_best_of_3", "emc", "dac"):
            got = np.array([by[m]["usage"][a] for a in ("token", "prune", "quant")])
            assert (np.abs(got - matched) <= STEP / T + 1e-6).all(), (m, got, matched)
            assert by[m]["target"] == pytest.approx(dict(zip(("token", "prune", "quant"), matched)))
        assert by["random_best_of_3"]["ppl"] == pytest.approx(min(by["random_mean"]["ppl_trials"]))
        assert pol["ppl_ci"][0] < pol["ppl"] < pol["ppl_ci"][1]
        assert abs(pol["net_keep"] - matched.mean()) < 1e-9


def test_dense_point_is_the_plain_models_teacher_forced_perplexity(sweep):
    h = lm.forward(LM_CFG, LM[1], jnp.asarray(BLOCKS[:, :-1]))
    logp = jax.nn.log_softmax(lm.logits(LM_CFG, LM[1], h), -1)
    lp = np.take_along_axis(np.asarray(logp), BLOCKS[:, 1:, None], -1)[..., 0][:, M:]
    dense = next(p for p in sweep["points"] if p["method"] == "dense")
    assert dense["ppl"] == pytest.approx(math.exp(-lp.mean()), rel=1e-4)
    np.testing.assert_allclose(dense["block_nll"], -lp.mean(1), atol=2e-5)


def test_report_and_cli(sweep, tmp_path, capsys):
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert main(["eval", "report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| 0.30/0.70/0.50 |" in text and "Budget adherence" in text
    for name in ("report.md", "pareto.png", "adherence.png", "actions.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert main(["eval", "report", str(tmp_path / "missing")]) == 2


def test_pareto_targets_and_config_errors():
    pts = [{"net_keep": 0.5, "ppl": 10.0}, {"net_keep": 0.6, "ppl": 11.0}, {"net_keep": 0.7, "ppl": 9.0},
           {"net_keep": 0.4, "ppl": 12.0}]
    assert [p["net_keep"] for p in pareto_front(pts)] == [0.4, 0.5, 0.7]
    rows = [{"ms_per_token": m, "nll": n} for m, n in ((140, 3.2), (130, 3.3), (135, 3.4), (145, 3.1), (150, 3.1))]
    assert [r["ms_per_token"] for r in pareto_front(rows, "ms_per_token", "nll")] == [130, 140, 145]
    assert parse_targets("0.5,0.8,0.5; 0.3,0.6,0.3125") == ((0.5, 0.8, 0.5), (0.3, 0.6, 0.3125))
    assert parse_targets("0.5,0.8,8") == ((0.5, 0.8, 0.5),)  # a bit width, as everywhere
    nk = [np.mean(t) for t in default_targets(GRID)]
    assert nk == sorted(nk) and nk[0] < 0.45 and nk[-1] > 0.85
    assert default_static(GRID) == ("quest:0.1", "quest:0.5", "teal:0.6", "zeroquant:5", "zeroquant:8")
    for bad in ("0.5,0.8", "0.5,0.8,17", "0.5,0.8,1.5", "a,b,c", ""):
        with pytest.raises(SoljaxError):
            parse_targets(bad)
    for kw in (dict(methods=("policy", "oracle")), dict(num_blocks=0), dict(static=("quest:2",)),
               dict(static=("zeroquant:4.5",)), dict(targets=((0.5, 0.5),))):
        with pytest.raises(SoljaxError):
            SweepConfig(**kw)


def test_baselines_without_a_policy_are_matched_to_the_targets():
    sc = SweepConfig(num_blocks=4, batch_size=4, methods=("fixed",), targets=((0.5, 0.8, 0.5),))
    (pt,) = Sweep(LM, CFG, {}, sc).run(BLOCKS[:4], progress=False)["points"]
    assert pt["method"] == "fixed" and pt["target"] == pytest.approx({"token": 0.5, "prune": 0.8, "quant": 0.5})
    assert abs(pt["usage"]["token"] - 0.5) <= STEP[0] / T + 1e-6


def test_guarded_sweep_caps_the_policy_and_says_so(tmp_path):
    sc = SweepConfig(num_blocks=4, batch_size=4, methods=("policy", "fixed"), targets=((0.3, 0.7, 0.4),), guard=True)
    result = Sweep(LM, CFG, _dense_loving_policy(), sc).run(BLOCKS[:4], progress=False)
    pol, fixed = result["points"]
    assert all(pol["usage"][a] <= t + 1e-5 for a, t in zip(("token", "prune", "quant"), (0.3, 0.7, 0.4)))
    assert fixed["target"] == pytest.approx(pol["usage"])
    (tmp_path / "sweep.json").write_text(json.dumps(result))
    assert "hard cap" in markdown(load_sweep(tmp_path))
    # at the grid's floor every action is the cheapest: the policy's schedule is the fixed one, and
    # both are scored in the same call, so their NLLs agree to the bit (batches of 2: the report's
    # passages then hold the first batch's 2 blocks)
    sc = dataclasses.replace(sc, targets=((0.1, 0.6, 5 / 16),), batch_size=2)
    result = Sweep(LM, CFG, _dense_loving_policy(), sc).run(BLOCKS[:4], progress=False)
    pol, fixed = result["points"]
    assert pol["block_nll"] == fixed["block_nll"]
    assert [len(p["blocks"]) for p in result["passages"]] == [2]
