"""GRPO trainer: update arithmetic, exact resume after a kill, config and input errors."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_lm
from soljax.config import TrainConfig, updates_per_batch
from soljax.errors import SoljaxError
from soljax.train.trainer import Trainer, sample_targets
from soljax.runs import load_policy

LM_CFG, LM_PARAMS = tiny_lm()
LM = (LM_CFG, LM_PARAMS, None)
BLOCKS = np.random.default_rng(0).integers(0, 97, (40, 16 + 4 + 1))
SMALL = ["context_len=16", "rollout_len=4", "batch_size=2", "grpo_rollouts_per_input=4", "policy_d_model=32",
         "policy_n_heads=2", "policy_max_len=8", "ppo_target_batch_size=64", "ppo_minibatch_size=16",
         "grad_accum_steps=2", "quest_page_size=4", "Ts=1", "Tw=1", "checkpoint_every=2", "max_batches=8",
         "lr=1e-3"]


def _trainer(*overrides):
    return Trainer(TrainConfig.load(None, SMALL + list(overrides)), lm=LM, blocks=BLOCKS)


class Kill(Exception):
    pass


def test_update_arithmetic_follows_the_buffer_and_accumulation_rules(tmp_path):
    tr = _trainer()
    # 2 blocks x 4 schedules x 4 steps = 32 entries per batch; the buffer needs 64 -> 2 batches,
    # 16 episodes in minibatches of 16 // 4 = 4 -> 4 minibatches, an update every 2 -> 2 per buffer.
    assert (tr.batches_per_buffer, tr.capacity, tr.mb_size, tr.num_minibatches) == (2, 16, 4, 4)
    state = tr.run(tmp_path / "run", progress=False)
    assert int(state.batch) == 8 and int(state.updates) == 8 == tr.total_updates
    assert updates_per_batch(tr.cfg) == 1.0
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates"] for r in rows] == [0, 2, 2, 4, 4, 6, 6, 8]
    assert (tmp_path / "run" / "training.png").is_file()
    cfg, policy = load_policy(tmp_path / "run")
    assert cfg == tr.cfg
    for a, b in zip(jax.tree.leaves(state.policy), jax.tree.leaves(policy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(SoljaxError, match="no checkpoint 3"):
        load_policy(tmp_path / "run", step=3)
    with pytest.raises(SoljaxError, match="not a soljax training run"):
        load_policy(tmp_path)
    # one optimizer step per buffer pass: every minibatch is evaluated with the rollout's policy
    on_policy = _trainer("grad_accum_steps=4", "max_batches=4").run(tmp_path / "on", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert int(on_policy["updates"]) == 2
    assert all(abs(r["ratio_mean"] - 1) < 1e-4 and r["clip_frac"] == 0 for r in rows if "ratio_mean" in r)


def test_kill_after_second_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    full = _trainer().run(tmp_path / "full", progress=False)
    saves = []

    def kill_after_second_checkpoint(state, metrics):
        ckpts = tmp_path / "cut" / "checkpoints"
        saves[:] = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
        if len(saves) >= 2:
            raise Kill()

    with pytest.raises(Kill):
        _trainer().run(tmp_path / "cut", progress=False, on_batch=kill_after_second_checkpoint)
    assert saves == [2, 4]
    resumed = _trainer().run(tmp_path / "cut", resume=True, progress=False)
    assert int(resumed["batch"]) == int(full["batch"])
    for a, b in zip(jax.tree.leaves(full["policy"]), jax.tree.leaves(resumed["policy"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["batch"] for ln in lines] == list(range(1, 9))


def test_fresh_run_refuses_an_existing_run_and_resume_checks_the_config(tmp_path):
    _trainer("max_batches=2").run(tmp_path / "r", progress=False)
    with pytest.raises(SoljaxError, match="--resume"):
        _trainer("max_batches=2").run(tmp_path / "r", progress=False)
    with pytest.raises(SoljaxError, match="differs"):
        _trainer("max_batches=2", "lr=0.5").run(tmp_path / "r", resume=True, progress=False)


def test_budget_targets_follow_lists_ranges_and_constants():
    cfg = TrainConfig.load(None, ["budget_tok_list=[0.2, 0.5]", "budget_prune_min=0.4", "budget_prune_max=0.5",
                                  "budget_q_ratio_min=null", "budget_q_ratio_max=null", "C_target_quant_bits=8"])
    t = np.asarray(sample_targets(cfg, jax.random.PRNGKey(0), 512))
    np.testing.assert_allclose(np.unique(t[:, 0]), [0.2, 0.5])
    assert t[:, 1].min() >= 0.4 and t[:, 1].max() <= 0.5 and t[:, 1].std() > 0.01
    assert np.all(t[:, 2] == 0.5)


@pytest.mark.parametrize("overrides, needle", [
    (["learning_rate=1"], "unknown keys"),
    (["budget_tok_min=0.8", "budget_tok_max=0.2"], "budget range"),
    (["budget_prune_min=0.5", "budget_prune_max=null"], "together"),
    (["budget_q_ratio_list=[0, 0.5]"], "budget_q_ratio_list"),
    (["grpo_rollouts_per_input=1"], "at least 2"),
    (["lr=fast"], "number"),
])
def test_bad_config_values(overrides, needle):
    with pytest.raises(SoljaxError, match=needle):
        TrainConfig.load(None, overrides)


def test_missing_model_and_config_file(tmp_path):
    with pytest.raises(SoljaxError, match="model.json"):
        Trainer(TrainConfig.load(None, [f"model={tmp_path}"]))
    with pytest.raises(SoljaxError, match="not found"):
        TrainConfig.load(tmp_path / "nope.yaml")
