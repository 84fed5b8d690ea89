"""Scale-out: mesh and sharding rules, sharded == single-device training, multi-process, restores.

The multi-device checks need 8 simulated CPU devices (``--xla_force_host_platform_device_count``
must be set before JAX starts), so they run in subprocesses (tests/train/parallel_worker.py), all
started together: the single-device reference, the 8-device meshes and the two processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import worker_output
from soljax import parallel
from soljax.config import TrainConfig
from soljax.errors import SoljaxError
from soljax.train.trainer import Trainer
from soljax.runs import load_policy
from soljax.train.writer import RunWriter

sys.path.insert(0, str(Path(__file__).parent))
import parallel_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 400


# ----------------------------------------------------------------------------------------------
# Rules and config errors (no devices needed)


@pytest.mark.parametrize("data, model, devices, shape", [
    (0, 1, 8, (8, 1)), (0, 0, 8, (8, 1)), (0, 2, 8, (4, 2)), (2, 0, 8, (2, 4)), (4, 2, 8, (4, 2)),
    (1, 1, 8, (1, 1)), (0, 1, 1, (1, 1)),
])
def test_mesh_shape_infers_the_missing_axis(data, model, devices, shape):
    assert parallel.mesh_shape(data, model, devices) == shape


@pytest.mark.parametrize("data, model, devices, needle", [
    (0, 3, 8, "mesh_model=3 does not divide the 8 devices"),
    (3, 0, 8, "mesh_data=3 does not divide"),
    (4, 4, 8, "needs more than the 8 devices"),
    (-1, 1, 8, "non-negative"),
])
def test_mesh_shape_errors(data, model, devices, needle):
    with pytest.raises(SoljaxError, match=needle):
        parallel.mesh_shape(data, model, devices)


def test_make_mesh_checks_devices_and_batch():
    one = jax.devices()[:1]
    with pytest.raises(SoljaxError, match="needs more than the 1 devices"):
        parallel.make_mesh(TrainConfig.load(None, ["mesh_data=2", "mesh_model=1", "batch_size=2"]), one)
    fake = one * 4  # only the count matters before the batch check
    unchecked = types.SimpleNamespace(mesh_data=4, mesh_model=1, batch_size=2)  # TrainConfig refuses it itself
    with pytest.raises(SoljaxError, match="batch_size 2 does not divide over mesh_data=4"):
        parallel.make_mesh(unchecked, fake)
    assert parallel.mesh_shape(0, 0, 4, 2) == (2, 2)  # inferred: the batch's blocks over data, the rest on model
    assert parallel.plan_from_config(TrainConfig(), one) is None  # one device: the plain path


@pytest.mark.parametrize("overrides, needle", [
    (["mesh_data=3", "batch_size=4"], "multiple of mesh_data"),
    (["shard_policy=zero"], "shard_policy"),
    (["distributed=yes"], "distributed"),
    (["coordinator_address=localhost"], "HOST:PORT"),
    (["num_processes=2", "process_id=2"], "out of range"),
    (["mesh_model=-2"], "non-negative"),
])
def test_bad_scaleout_config(overrides, needle):
    with pytest.raises(SoljaxError, match=needle):
        TrainConfig.load(None, overrides)


def test_lm_rules_split_heads_mlp_and_vocab_over_model():
    P = jax.sharding.PartitionSpec
    assert parallel.lm_param_spec("wq", (2, 32, 4, 8), 2) == P(None, None, "model")
    assert parallel.lm_param_spec("wo", (2, 4, 8, 32), 2) == P(None, "model")
    assert parallel.lm_param_spec("w_up", (2, 32, 64), 4) == P(None, None, "model")
    assert parallel.lm_param_spec("w_down", (2, 64, 32), 4) == P(None, "model")
    assert parallel.lm_param_spec("embed", (96, 32), 2) == P("model")
    assert parallel.lm_param_spec("lm_head", (32, 96), 2) == P(None, "model")
    assert parallel.lm_param_spec("wk", (2, 32, 2, 8), 4) == P()  # 2 KV heads on 4 devices: replicated
    assert parallel.lm_param_spec("attn_norm", (2, 32), 2) == P()
    assert parallel.lm_param_spec("wq", (2, 32, 4, 8), 1) == P()
    assert parallel.fsdp_spec((32, 96), 4) == P(None, "data")
    assert parallel.fsdp_spec((6, 5), 4) == P()
    assert parallel.fsdp_spec((), 4) == P()


def test_distributed_settings_come_from_config_then_environment(monkeypatch):
    for name in ("SOLJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "SOLJAX_NUM_PROCESSES", "SOLJAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    cfg = TrainConfig()
    assert parallel.distributed_settings(cfg) == {"coordinator_address": None, "num_processes": None,
                                                  "process_id": None}
    assert parallel.initialize_distributed(cfg) is False  # auto, nothing known: single process
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("SOLJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("SOLJAX_PROCESS_ID", "3")
    assert parallel.distributed_settings(cfg) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                  "process_id": 3}
    cfg = TrainConfig.load(None, ["coordinator_address=host0:8476", "process_id=1"])
    assert parallel.distributed_settings(cfg) == {"coordinator_address": "host0:8476", "num_processes": 4,
                                                  "process_id": 1}
    monkeypatch.setenv("SOLJAX_PROCESS_ID", "one")
    with pytest.raises(SoljaxError, match="SOLJAX_PROCESS_ID must be an integer"):
        parallel.distributed_settings(TrainConfig())


# ----------------------------------------------------------------------------------------------
# Sharded and multi-process runs against the single-device reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(Path(__file__).parent / "parallel_worker.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs the workers (all at once) and returns the directory, the single-device reference and
    initial state, the worker logs and a (never compiled) single-device trainer of this process."""
    out = tmp_path_factory.mktemp("parallel")
    port = _free_port()
    procs = {"reference": _spawn(["reference", str(out)], 1), "meshes": _spawn(["meshes", str(out)], 8),
             "p0": _spawn(["process", str(out), str(port), "0"], 4),
             "p1": _spawn(["process", str(out), str(port), "1"], 4)}
    logs = {name: worker_output(p, TIMEOUT_S) for name, p in procs.items()}
    tr = Trainer(worker.config(), lm=worker.tiny_lm(), blocks=worker.tiny_blocks())
    assert tr.plan is None
    return {"dir": out, "reference": dict(np.load(out / "reference.npz")),
            "initial": dict(np.load(out / "initial.npz")), "logs": logs, "trainer": tr}


def _compare(got: dict, ref: dict, initial: dict) -> None:
    assert int(got["updates"]) == int(ref["updates"]) == 2 and int(got["batch"]) == 1
    # rollout results: the same sampled schedules, log-probs, observations and advantages
    np.testing.assert_array_equal(got["buffer/actions"], ref["buffer/actions"])
    np.testing.assert_array_equal(got["buffer/targets"], ref["buffer/targets"])
    for key in ("buffer/logp_old", "buffer/h_prev", "buffer/adv"):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5, rtol=1e-5, err_msg=key)
    m_got, m_ref = json.loads(str(got["metrics"])), json.loads(str(ref["metrics"]))
    for key in ("logp_true", "reward_mean", "penalty_mean", "gap_abs_mean", "grad_norm", "ratio_mean"):
        assert m_got[key] == pytest.approx(m_ref[key], rel=1e-5, abs=1e-5), key
    # the policy after the update, and it did move
    keys = [k for k in ref if k.startswith("policy")]
    assert keys and set(keys) == {k for k in got if k.startswith("policy")}
    moved = max(float(np.abs(ref[k] - initial[k]).max()) for k in keys)
    assert moved > 1e-4  # lr = 1e-4, two AdamW steps
    for k in keys:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=k)


@pytest.mark.parametrize("mesh", list(worker.MESHES))
def test_sharded_update_equals_single_device(runs, mesh):
    """One update over `data` (8 x 1) and over `data` x `model` (4 x 2, policy fsdp)."""
    _compare(dict(np.load(runs["dir"] / f"{mesh}.npz")), runs["reference"], runs["initial"])
    log = {r["mesh"]: r for r in runs["logs"]["meshes"] if "mesh" in r}[mesh]
    data, model, policy = worker.MESHES[mesh]
    assert log["wq_shard"] == [2, 32, 4 // model, 8]  # heads split over `model`
    assert log["buffer_shard"][0] == 32 // data  # buffered episodes split over `data`
    assert (log["policy_spec"] != "P()") == (policy == "fsdp")


def test_two_processes_match_the_single_process_run(runs):
    _compare(dict(np.load(runs["dir"] / "multiprocess.npz")), runs["reference"], runs["initial"])
    assert sorted(r["process"] for name in ("p0", "p1") for r in runs["logs"][name]) == [0, 1]
    # only process 0 logs: one metrics line
    assert len((runs["dir"] / "multiprocess" / "metrics.jsonl").read_text().splitlines()) == 1


def test_checkpoints_restore_onto_another_mesh(runs):
    # in the worker: data4_model2 (policy fsdp) -> data8 (replicated), values and shardings checked there
    restored = [(r["restored"], r["onto"]) for r in runs["logs"]["meshes"] if "restored" in r]
    assert restored == [("data4_model2", "data8")]
    # here: the 8-device and the two-process checkpoints restore onto this single device
    tr = runs["trainer"]
    for name in ("data4_model2", "multiprocess"):
        state = RunWriter(runs["dir"] / name, tr.cfg).restore(tr.abstract_state())
        got = worker.summary(state)
        for key in got:
            np.testing.assert_array_equal(got[key], np.load(runs["dir"] / f"{name}.npz")[key], err_msg=key)
        assert all(x.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]) for x in jax.tree.leaves(state))
        _, policy = load_policy(runs["dir"] / name)
        for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(state.policy)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_command_takes_the_distributed_flags(capsys):
    from soljax.cli import main

    assert main(["train", "--num-processes", "2", "--process-id", "2", "max_batches=1"]) == 2
    assert "process_id 2 is out of range for num_processes 2" in capsys.readouterr().err
