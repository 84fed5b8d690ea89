"""Subprocess side of tests/train/test_parallel.py: sharded training updates on simulated CPU devices.

JAX fixes its device count when it starts, so the multi-device checks run here, in a fresh
interpreter, with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set by the caller (who
also lowers XLA's backend optimization level: these programs are compiled once and run once).

``python tests/train/parallel_worker.py reference OUT``: the single-device reference (the plain,
unsharded path): ``OUT/reference.npz`` after the update and ``OUT/initial.npz`` before it.

``python tests/train/parallel_worker.py meshes OUT``: on 8 devices, one training update (one data batch
filling the buffer, one pass of minibatches) for each mesh in ``MESHES``; writes ``OUT/<name>.npz``
with the policy, the buffered rollout and the metrics; the last one also writes a checkpoint,
which is then restored onto the first mesh (values and shardings checked here).

``python tests/train/parallel_worker.py process OUT PORT PID``: one of two processes (4 devices each)
joined over localhost with ``jax.distributed``; they train the same update on one 8-device mesh
and process 0 writes ``OUT/multiprocess.npz``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# One training update: 8 blocks x 4 schedules x 4 steps = 128 buffer entries = one buffer; 32
# episodes in minibatches of 8 -> 4 minibatches; an optimizer step every 2 -> 2 updates. Adam's
# first steps move every weight by about lr whatever its gradient's size, so a weight with a
# near-zero gradient can differ by a fraction of lr under another summation order: lr = 1e-4
# keeps that far below the 1e-5 tolerance while a wrong gradient would move weights by ~lr.
LM_SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)
OVERRIDES = ["context_len=16", "rollout_len=4", "batch_size=8", "grpo_rollouts_per_input=4", "policy_d_model=32",
             "policy_n_heads=2", "policy_max_len=8", "ppo_target_batch_size=128", "ppo_minibatch_size=32",
             "grad_accum_steps=2", "quest_page_size=4", "Ts=1", "Tw=1", "max_batches=1", "lr=1e-4",
             "keep_fracs=[0.25, 1.0]", "checkpoint_every=100"]
# name -> (mesh_data, mesh_model, shard_policy); the last run's checkpoint is restored on the first mesh.
MESHES = {"data8": (8, 1, "replicated"), "data4_model2": (4, 2, "fsdp")}
BUFFER_KEYS = ("actions", "logp_old", "adv", "h_prev", "targets")


def tiny_lm():
    """A random LM (drawn with numpy: no per-leaf compiles in every process)."""
    import jax

    from soljax.lm import LMConfig
    from soljax.lm.checkpoint import params_from_numpy
    from soljax.lm.params import param_shapes

    cfg = LMConfig(**LM_SHAPE)
    rng = np.random.default_rng(0)
    shapes = param_shapes(cfg)
    tree = jax.tree_util.tree_map_with_path(
        lambda path, shape: (1.0 + 0.1 * rng.standard_normal(shape) if "norm" in jax.tree_util.keystr(path)
                             else 0.3 * rng.standard_normal(shape)).astype(np.float32),
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    return cfg, params_from_numpy(cfg, tree), None


def tiny_blocks() -> np.ndarray:
    return np.random.default_rng(0).integers(0, LM_SHAPE["vocab_size"], (16, 16 + 4 + 1))


def config(*extra: str):
    from soljax.config import TrainConfig

    return TrainConfig.load(None, OVERRIDES + list(extra))


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def summary(state, metrics: dict | None = None) -> dict[str, np.ndarray]:
    """What the tests compare: policy leaves, the buffered rollout, counters (host copies)."""
    from soljax import parallel

    tree = state.to_tree()
    host = parallel.gather({"policy": tree["policy"], "buffer": {k: tree["buffer"][k] for k in BUFFER_KEYS},
                            "updates": tree["updates"], "batch": tree["batch"]})
    out = {f"policy{k}": v for k, v in flat(host["policy"]).items()}
    out.update({f"buffer/{k}": np.asarray(host["buffer"][k]) for k in BUFFER_KEYS})
    out["updates"], out["batch"] = np.asarray(host["updates"]), np.asarray(host["batch"])
    if metrics is not None:
        out["metrics"] = np.asarray(json.dumps(metrics))
    return out


def run_meshes(out: Path) -> None:
    import jax

    from soljax.train.trainer import Trainer
    from soljax.train.writer import RunWriter

    assert len(jax.devices()) == 8, jax.devices()
    lm, blocks = tiny_lm(), tiny_blocks()
    names = list(MESHES)
    states = {}
    for name in names:
        data, model, policy = MESHES[name]
        tr = Trainer(config(f"mesh_data={data}", f"mesh_model={model}", f"shard_policy={policy}"), lm=lm,
                     blocks=blocks)
        assert (tr.plan.data_size, tr.plan.model_size) == (data, model)
        states[name], metrics = tr.train_step(tr.init_state())
        if name == names[-1]:
            writer = RunWriter(out / name, tr.cfg)
            writer.start_fresh()
            writer.save(states[name])
        np.savez(out / f"{name}.npz", **summary(states[name], metrics))
        # the LM really is split: attention heads over `model`, blocks over `data`
        wq = tr.lm_params["layers"]["wq"]
        print(json.dumps({"mesh": name, "wq_shard": list(wq.addressable_shards[0].data.shape),
                          "buffer_shard": list(states[name].buffer.adv.addressable_shards[0].data.shape),
                          "policy_spec": str(jax.tree.leaves(states[name].policy)[-1].sharding.spec)}))
    # a checkpoint written with one mesh restores onto another (values and target shardings)
    for src, dst in [(names[-1], names[0])]:
        data, model, policy = MESHES[dst]
        tr = Trainer(config(f"mesh_data={data}", f"mesh_model={model}", f"shard_policy={policy}"), lm=lm,
                     blocks=blocks)
        target = tr.abstract_state()
        restored = RunWriter(out / src, tr.cfg).restore(target)
        for (path, a), b, t in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(states[src]),
                                   jax.tree.leaves(target)):
            assert a.sharding == t.sharding, (path, a.sharding, t.sharding)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        print(json.dumps({"restored": src, "onto": dst}))


def run_reference(out: Path) -> None:
    import jax

    from soljax.train.trainer import Trainer

    assert len(jax.devices()) == 1
    tr = Trainer(config(), lm=tiny_lm(), blocks=tiny_blocks())
    assert tr.plan is None
    state = tr.init_state()
    np.savez(out / "initial.npz", **summary(state))
    state, metrics = tr.train_step(state)
    np.savez(out / "reference.npz", **summary(state, metrics))


def run_process(out: Path, port: int, pid: int) -> None:
    cfg = config(f"coordinator_address=localhost:{port}", "num_processes=2", f"process_id={pid}",
                 "mesh_model=2")
    from soljax import parallel

    assert parallel.initialize_distributed(cfg)  # before any JAX computation (tiny_lm computes)
    import jax

    from soljax.train.trainer import Trainer

    assert jax.process_count() == 2 and len(jax.local_devices()) == 4 and len(jax.devices()) == 8
    tr = Trainer(cfg, lm=tiny_lm(), blocks=tiny_blocks())
    assert (tr.plan.data_size, tr.plan.model_size) == (4, 2)
    seen = []
    state = tr.run(out / "multiprocess", progress=False, on_batch=lambda s, m: seen.append(m))
    result = summary(state, seen[0])
    if pid == 0:
        np.savez(out / "multiprocess.npz", **result)
    print(json.dumps({"process": pid, "updates": int(result["updates"])}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "meshes":
        run_meshes(out)
    elif mode == "reference":
        run_reference(out)
    else:
        run_process(out, int(sys.argv[3]), int(sys.argv[4]))
