"""Subprocess side of tests/train/test_paper_configs.py: the paper's configs on simulated CPU devices.

``python tests/train/paper_worker.py OUT STANDINS_JSON DEVICES CONFIG...`` (``XLA_FLAGS`` with
``--xla_force_host_platform_device_count=DEVICES`` set by the caller, before JAX starts): for each
``configs/paper/CONFIG.yaml``, trains with the config unchanged apart from ``model=`` (the tiny
stand-in for the config's model named in STANDINS_JSON) and ``max_batches`` (the data batches that
fill the config's first buffer, so its first learning pass runs: see :func:`first_learn_pass`),
checkpoints, then resumes the run for one more batch.
Prints one JSON line per config (mesh, where the LM's weights went, updates, seconds).

The configs read ``data: hf:allenai/dolma:...``, which needs the network: here
``datasets.load_dataset`` (the one call through which soljax reads a Hugging Face dataset) is
replaced, for that dataset only, by synthetic documents in the stand-ins' word vocabulary. Every
other step (config loading, mesh inference, the LM restored onto the mesh, tokenization, the token
cache, blocks, rollouts, the update, checkpoints, the resume) is soljax's own.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper"
DOCS, WORDS_PER_DOC = 240, 1000  # 240k tokens: enough blocks for every config's batches at its train_fraction
DATASET = ("allenai/dolma", "v1_6-sample", "train")


def synthetic_documents(vocab_size: int) -> list[str]:
    """Documents of random words ``w1``.. ``w{vocab_size - 1}`` (the stand-ins' word tokenizer)."""
    rng = np.random.default_rng(0)
    return [" ".join(f"w{i}" for i in rng.integers(1, vocab_size, WORDS_PER_DOC)) for _ in range(DOCS)]


def patch_datasets(vocab_size: int) -> None:
    """``datasets.load_dataset`` serves the paper configs' dataset from local synthetic documents."""
    import datasets

    real = datasets.load_dataset
    docs = synthetic_documents(vocab_size)

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if (path, name, split) != DATASET:
            return real(path, name, *args, split=split, streaming=streaming, **kwargs)
        if streaming:
            return datasets.IterableDataset.from_generator(lambda: ({"text": d} for d in docs))
        return datasets.Dataset.from_dict({"text": docs})

    datasets.load_dataset = load_dataset


def first_learn_pass(cfg) -> int:
    """The data batches up to the end of the config's first learning pass, by the trainer's
    arithmetic: a buffer of ``ppo_target_batch_size`` step entries fills in that many batches, then
    one pass of minibatches over it computes the PPO gradients."""
    return math.ceil(cfg.ppo_target_batch_size / (cfg.rollout_len * cfg.batch_size * cfg.grpo_rollouts_per_input))


def updates_after(cfg, batches: int) -> int:
    """Optimizer updates after ``batches`` data batches: an AdamW step every ``grad_accum_steps``
    minibatches, counted across learning passes (so it may come passes after the first)."""
    per_buffer = first_learn_pass(cfg)
    minibatches = math.ceil(per_buffer * cfg.batch_size * cfg.grpo_rollouts_per_input
                            / max(1, cfg.ppo_minibatch_size // cfg.rollout_len))
    return batches // per_buffer * minibatches // cfg.grad_accum_steps


def run_config(name: str, standin: str, out: Path) -> dict:
    import jax

    from soljax.config import TrainConfig
    from soljax.runs import checkpoint_steps, read_metrics
    from soljax.train.trainer import Trainer

    path = PAPER / f"{name}.yaml"
    cfg = TrainConfig.load(path)
    n, updates = first_learn_pass(cfg), updates_after(cfg, first_learn_pass(cfg))
    cpu, start = time.process_time(), time.perf_counter()
    tr = Trainer(TrainConfig.load(path, [f"model={standin}", f"max_batches={n}"]))
    state = tr.run(out / name, progress=False)
    first_s = time.perf_counter() - start
    assert (int(state.batch), int(state.updates)) == (n, updates), (name, int(state.batch), int(state.updates))
    rows = read_metrics(out / name / "metrics.jsonl")
    assert "learn_s" in rows[-1] and np.isfinite(rows[-1]["ratio_mean"]), (name, rows[-1])  # the learning pass ran
    assert checkpoint_steps(out / name) == [n]
    # resume from that checkpoint for one more batch (max_batches may change on resume)
    start = time.perf_counter()
    tr2 = Trainer(TrainConfig.load(path, [f"model={standin}", f"max_batches={n + 1}"]))
    state2 = tr2.run(out / name, resume=True, progress=False)
    resume_s = time.perf_counter() - start
    assert (int(state2.batch), int(state2.updates)) == (n + 1, updates_after(cfg, n + 1)), (name, int(state2.batch))
    assert [r["batch"] for r in read_metrics(out / name / "metrics.jsonl")] == list(range(1, n + 2))
    plan = tr.plan
    wq, embed = tr.lm_params["layers"]["wq"], tr.lm_params["embed"]
    return {"config": name, "devices": len(jax.devices()),
            "mesh": None if plan is None else [plan.data_size, plan.model_size],
            "wq": [list(wq.shape), list(wq.addressable_shards[0].data.shape)],
            "embed": [list(embed.shape), list(embed.addressable_shards[0].data.shape)],
            "batches": n, "updates": updates, "first_s": round(first_s, 1), "resume_s": round(resume_s, 1),
            "cpu_s": round(time.process_time() - cpu, 1)}


def main(out: Path, standins: dict[str, str], devices: int, names: list[str]) -> None:
    import jax

    assert len(jax.devices()) == devices, jax.devices()
    # the resumed run compiles the same programs again: read them from a compilation cache
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from soljax.config import TrainConfig
    from soljax.lm.checkpoint import load_config

    patch_datasets(load_config(Path(next(iter(standins.values())))).vocab_size)
    for name in names:
        model = TrainConfig.load(PAPER / f"{name}.yaml").model
        print(json.dumps(run_config(name, standins[model], out)), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
