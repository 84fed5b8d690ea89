"""GRPO trainer: update arithmetic, bit-exact resume after ``soljax train`` is killed, config and
input errors."""

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import tiny_lm
from soljax.config import TrainConfig, updates_per_batch
from soljax.errors import SoljaxError
from soljax.lm.checkpoint import save_model
from soljax.lm.tokenizer import Tokenizer
from soljax.runs import checkpoint_steps, load_checkpoint, load_policy, read_metrics
from soljax.train.trainer import Trainer, sample_targets
from soljax.train.writer import KILL_AT_ENV, RunWriter

LM_CFG, LM_PARAMS = tiny_lm()
LM = (LM_CFG, LM_PARAMS, None)
BLOCKS = np.random.default_rng(0).integers(0, 97, (40, 16 + 4 + 1))
SMALL = ["context_len=16", "rollout_len=4", "batch_size=2", "grpo_rollouts_per_input=4", "policy_d_model=32",
         "policy_n_heads=2", "policy_max_len=8", "ppo_target_batch_size=64", "ppo_minibatch_size=16",
         "grad_accum_steps=2", "quest_page_size=4", "Ts=1", "Tw=1", "checkpoint_every=2", "max_batches=8",
         "lr=1e-3"]


def _trainer(*overrides):
    return Trainer(TrainConfig.load(None, SMALL + list(overrides)), lm=LM, blocks=BLOCKS)


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
    assert int(on_policy.updates) == 2
    assert all(abs(r["ratio_mean"] - 1) < 1e-4 and r["clip_frac"] == 0 for r in rows if "ratio_mean" in r)


# ----------------------------------------------------------------------------------------------
# Killing `soljax train` (SIGKILL, SIGINT) and resuming: bit for bit the uninterrupted run

# 2 blocks x 4 schedules x 4 steps = 32 entries per batch; the buffer needs 96 -> 3 batches, 24
# episodes in 6 minibatches of 4, an update every 5 minibatches: after batches 3, 6, 9 the
# accumulator holds 1, 2, 3 minibatches (an accumulation always pending), one checkpoint per update
# (at batches 3, 6, 9) and the final one at batch 11, in the middle of the fourth buffer.
KILL_RUN = ["context_len=16", "rollout_len=4", "batch_size=2", "grpo_rollouts_per_input=4", "policy_d_model=32",
            "policy_n_heads=2", "policy_max_len=8", "ppo_target_batch_size=96", "ppo_minibatch_size=16",
            "grad_accum_steps=5", "quest_page_size=4", "Ts=1", "Tw=1", "checkpoint_every=1", "max_batches=11",
            "keep_checkpoints=20", "lr=1e-3", "lr_schedule=cosine", "warmup_updates=1"]
KILL_BATCHES = 11
TIMING = {"rollout_s", "learn_s", "schedule_steps_per_s"}
TMP = ".orbax-checkpoint-tmp"


# scenario -> the SOLJAX_KILL_AT of each stopped attempt (then the run is resumed to the end)
KILLS = {
    # SIGKILL after batch 5: checkpoint 3 is the latest, the buffer holds batches 4-5 and one
    # minibatch's gradient is accumulated; batches 4-5 are redone
    "between-checkpoints-mid-buffer": ["batch:5"],
    # SIGKILL while the first checkpoint is written (the resumed run has none: it starts afresh),
    # then while checkpoint 6 is written (resumed from 3); each leaves a torn metrics line too
    "during-checkpoint-writes": ["save:3", "save:6"],
    # SIGTERM after batch 5 (a preempted VM), then SIGINT after batch 7 (Ctrl-C): each time the
    # state is saved mid-buffer (batch 7: 2 minibatches accumulated) and resumed from there
    "terminate-then-interrupt-mid-buffer": ["terminate:5", "interrupt:7"],
}


def _train(kill: dict, out: Path, *, resume: bool = False, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """``soljax train`` into ``out`` in a subprocess, stopping itself at ``kill_at`` (SOLJAX_KILL_AT)."""
    env = dict(kill["env"], **({KILL_AT_ENV: kill_at} if kill_at else {}))
    cmd = [sys.executable, "-m", "soljax.cli", "train", "--quiet", "--out", str(out), *kill["overrides"]]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True, text=True,
                          timeout=600)


def _stopped_run(kill: dict, run: Path, points: list[str]) -> list[dict]:
    """Trains into ``run`` stopping at each point in turn (resuming after the first), then resumes
    it to the end; returns what each attempt left behind."""
    seen = []
    for i, point in enumerate(points + [None]):
        proc = _train(kill, run, resume=i > 0, kill_at=point)
        seen.append({"point": point, "exit": proc.returncode, "stderr": proc.stderr[-3000:],
                     "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
                     "batches": [row["batch"] for row in read_metrics(run / "metrics.jsonl")]})
        if point and point.startswith("save:"):
            with open(run / "metrics.jsonl", "a") as fh:  # the next row, torn by the kill
                fh.write('{"batch": %d, "reward_me' % (int(point[5:]) + 1))
    return seen


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, word_tokenizer_json):
    """The uninterrupted reference run and, for each scenario of :data:`KILLS`, the run stopped
    and resumed (all ``soljax train`` subprocesses on the tiny LM saved as a model directory and a
    text file of its words, sharing one compilation cache; the scenarios run concurrently)."""
    root = tmp_path_factory.mktemp("kill")
    save_model(root / "model", LM_CFG, LM[1], Tokenizer(word_tokenizer_json(LM_CFG.vocab_size)))
    words = np.random.default_rng(1).integers(1, LM_CFG.vocab_size, 24 * 21)
    (root / "data.txt").write_text(" ".join(f"w{i}" for i in words))
    env = dict(os.environ, JAX_PLATFORMS="cpu", SOLJAX_CACHE_DIR=str(root / "cache"),
               XLA_FLAGS="--xla_backend_optimization_level=0", JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop(KILL_AT_ENV, None)
    kill = {"env": env, "overrides": [f"model={root / 'model'}", f"data={root / 'data.txt'}", *KILL_RUN]}
    proc = _train(kill, root / "reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a suite started in the background of a shell ignores SIGINT, and so would its trainers: a
    # handler here (any) makes them start with the default one, i.e. Ctrl-C raises
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ThreadPoolExecutor(len(KILLS)) as pool:
            seen = dict(zip(KILLS, pool.map(lambda s: _stopped_run(kill, root / s, KILLS[s]), KILLS)))
    finally:
        signal.signal(signal.SIGINT, sigint)
    return root, seen


def _assert_same_states(a: dict, b: dict, where: str) -> None:
    """Every leaf (policy, ref, opt, grad_acc, accum, buffer, fill, batch, updates, key) equal, bit for bit."""
    flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
    assert flat_a.keys() == flat_b.keys(), where
    for path, leaf in flat_a.items():
        x, y = np.asarray(leaf), np.asarray(flat_b[path])
        assert x.dtype == y.dtype and x.shape == y.shape, (where, jax.tree_util.keystr(path))
        assert x.tobytes() == y.tobytes(), f"{where}: {jax.tree_util.keystr(path)} differs"


@pytest.mark.parametrize("scenario", list(KILLS))
def test_killed_training_resumes_bit_for_bit(stopped_runs, scenario):
    root, seen = stopped_runs
    ref, run = root / "reference", root / scenario
    *stops, end = seen[scenario]
    for stop in stops:
        kind, n = stop["point"].split(":")
        want = {"interrupt": 130, "terminate": 143}.get(kind, -signal.SIGKILL)
        assert stop["exit"] == want, f"{stop['point']}: exit {stop['exit']}\n{stop['stderr']}"
        assert stop["batches"] == list(range(1, int(n) + 1)), stop["point"]
        if kind == "save":  # killed with checkpoint n written but not committed
            assert f"{n}{TMP}" in stop["checkpoints"] and n not in stop["checkpoints"], stop
        if kind in ("interrupt", "terminate"):  # saved where it stopped
            assert n in stop["checkpoints"] and "saved at batch" in stop["stderr"], stop
    assert end["exit"] == 0, end["stderr"]
    assert not [name for name in end["checkpoints"] if TMP in name]
    # every checkpoint of the reference (the last one mid-buffer) equal bit for bit
    steps = checkpoint_steps(ref)
    assert steps == [3, 6, 9, KILL_BATCHES] and set(steps) <= set(checkpoint_steps(run))
    for step in steps:
        _assert_same_states(load_checkpoint(ref, step), load_checkpoint(run, step), f"checkpoint {step}")
    final = load_checkpoint(run)
    assert int(final["batch"]) == KILL_BATCHES and int(final["fill"]) == 16 and int(final["accum"]) == 3
    # exactly one metrics row per batch, each equal to the reference's (but for timings)
    rows, ref_rows = read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [r["batch"] for r in rows] == list(range(1, KILL_BATCHES + 1)) == [r["batch"] for r in ref_rows]
    for r, q in zip(rows, ref_rows):
        assert {k: v for k, v in r.items() if k not in TIMING} == {k: v for k, v in q.items() if k not in TIMING}
    assert (run / "metrics.jsonl").read_text().endswith("}\n")


def test_fresh_run_refuses_an_existing_run_and_resume_checks_the_config(tmp_path):
    _trainer("max_batches=2").run(tmp_path / "r", progress=False)
    with pytest.raises(SoljaxError, match="--resume"):
        _trainer("max_batches=2").run(tmp_path / "r", progress=False)
    with pytest.raises(SoljaxError, match="differs"):
        _trainer("max_batches=2", "lr=0.5").run(tmp_path / "r", resume=True, progress=False)


def _saved_run(run: Path, tr: Trainer) -> Path:
    """``run`` started fresh with ``tr``'s config and its initial state as the one checkpoint."""
    writer = RunWriter(run, tr.cfg)
    writer.start_fresh()
    writer.save(tr.init_state())
    writer.close()
    return run


def _restore(run: Path, tr: Trainer, cfg: TrainConfig):
    """The state restored from ``run`` by a writer with ``cfg`` (raises what the restore raises)."""
    writer = RunWriter(run, cfg)
    try:
        return writer.restore(tr.abstract_state())
    finally:
        writer.close()


def test_a_config_saved_before_a_key_existed_resumes_under_its_default(tmp_path):
    tr = _trainer()
    run = _saved_run(tmp_path / "r", tr)
    saved = run / "config.yaml"
    saved.write_text("".join(ln for ln in saved.read_text().splitlines(True) if not ln.startswith("data_max_docs:")))
    with pytest.raises(SoljaxError, match=r"differs in \['data_max_docs'\]"):
        _restore(run, tr, tr.cfg.replace(data_max_docs=5))
    assert int(_restore(run, tr, tr.cfg).batch) == 0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_resume_keeps_max_batches_under_a_decaying_learning_rate(tmp_path, schedule):
    tr = _trainer(f"lr_schedule={schedule}", "warmup_updates=1")
    run = _saved_run(tmp_path / "r", tr)
    if schedule == "constant":
        assert int(_restore(run, tr, tr.cfg.replace(max_batches=12)).batch) == 0
    else:
        with pytest.raises(SoljaxError, match=f"max_batches=12: it was 8, the horizon of its {schedule} "):
            _restore(run, tr, tr.cfg.replace(max_batches=12))


def test_read_metrics_leaves_out_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"batch": 1}\n{"batch": 2}\n{"batch": 3, "rew')
    assert read_metrics(path) == [{"batch": 1}, {"batch": 2}]
    path.write_text('{"batch": 1}\n{"batch": 2')
    assert read_metrics(path) == [{"batch": 1}]
    path.write_text('{"batch": 1}\n{"bat\n{"batch": 3}\n')
    with pytest.raises(SoljaxError, match="line 2 is not valid JSON"):
        read_metrics(path)


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
