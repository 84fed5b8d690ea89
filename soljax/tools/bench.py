"""``soljax bench rollout``: speed and memory of the rollout phase and of whole training updates.

Each measurement runs in a fresh subprocess (so peak RSS is its own) on the embedded model with
the joint 3-level grid, QUEST pages of 8, B = 2 blocks, K = 8 schedules, T = 16, fp32, and one
optimizer update per data batch. ``shared`` is soljax's engine (one context cache per block);
``copied`` does the same work with the context cache copied once per schedule, as the reference
implementation does.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np

BENCH_CONFIG = {
    "model": "embedded", "rollout_len": 16, "batch_size": 2, "grpo_rollouts_per_input": 8,
    "keep_fracs": [0.1, 0.6, 1.0], "struct_prune_choices": ["s40", "s80", "s100"],
    "quant_choices": ["q5", "q7", "q16"], "quest_page_size": 8,
    "ppo_target_batch_size": 256, "ppo_minibatch_size": 512, "grad_accum_steps": 1,
}


def measure(context_len: int, engine: str, repeats: int = 3) -> dict:
    """One row: seconds per rollout phase and per whole update, schedule-steps/s, peak RSS."""
    from soljax.config import TrainConfig
    from soljax.data.embedded import ensure_embedded_model
    from soljax.lm.checkpoint import load_model
    from soljax.train.trainer import Trainer

    cfg = TrainConfig.from_dict({**BENCH_CONFIG, "context_len": context_len, "rollout_engine": engine,
                                 "max_batches": repeats + 1})
    lm = load_model(ensure_embedded_model())
    n = (repeats + 1) * cfg.batch_size
    blocks = np.random.default_rng(0).integers(0, lm[0].vocab_size, (n, context_len + cfg.rollout_len + 1))
    trainer = Trainer(cfg, lm=lm, blocks=blocks)
    state = trainer.init_state()
    state, _ = trainer.train_step(state)  # compile
    rollout_s, update_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = trainer.train_step(state)
        update_s.append(time.perf_counter() - t0)
        rollout_s.append(m["rollout_s"])
    steps = cfg.batch_size * cfg.grpo_rollouts_per_input * cfg.rollout_len
    r = float(np.median(rollout_s))
    return {"context_len": context_len, "engine": engine, "rollout_s": r, "update_s": float(np.median(update_s)),
            "schedule_steps_per_s": steps / r,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_rollout(context_lens=(256, 1024), engines=("shared", "copied"), repeats: int = 3,
                  progress=None) -> dict:
    rows = []
    for m in context_lens:
        for engine in engines:
            if progress:
                progress(f"context {m}, {engine} engine")
            cmd = [sys.executable, "-m", "soljax.tools.bench", str(m), engine, str(repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"benchmark row failed: {out.stderr.strip().splitlines()[-1:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"rows": rows}


def format_table(result: dict) -> str:
    head = f"{'context':>7} {'engine':>7} {'rollout s':>10} {'update s':>9} {'sched-steps/s':>14} {'peak RSS MB':>12}"
    lines = [head]
    for r in result["rows"]:
        lines.append(f"{r['context_len']:>7} {r['engine']:>7} {r['rollout_s']:>10.2f} {r['update_s']:>9.2f} "
                     f"{r['schedule_steps_per_s']:>14.0f} {r['peak_rss_mb']:>12.0f}")
    by = {(r["context_len"], r["engine"]): r for r in result["rows"]}
    for m in sorted({r["context_len"] for r in result["rows"]}):
        if (m, "shared") in by and (m, "copied") in by:
            s, c = by[(m, "shared")], by[(m, "copied")]
            lines.append(f"context {m}: shared is {c['rollout_s'] / s['rollout_s']:.2f}x faster per rollout, "
                         f"{c['update_s'] / s['update_s']:.2f}x per update, uses "
                         f"{c['peak_rss_mb'] / s['peak_rss_mb']:.2f}x less peak memory")
    return "\n".join(lines)


if __name__ == "__main__":
    m, engine, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    print(json.dumps(measure(m, engine, repeats)))
