"""A small batch on the fast decode path against the masked step: serving episodes of B prompts.

    python scripts/fast_batch.py --run runs/demo [--batch 4] [--context 4000] [--target 0.2,0.7,0.45]
                                 [--rounds 3] [--out fast_batch.json]

On a training run's LM, B windows of ``context`` tokens of the eval split (one every 9,000 tokens)
are prefilled as one batch; then one teacher-forced serving episode of T tokens per row
(:func:`soljax.engine.episodes.run_episode`: T controlled steps, the controller, the page
summaries and the dense replay) runs for the fixed schedule and the policy at ``--target``, on the
fast path (one branch per axis and layer for the whole batch) and on the masked step, taking turns
``--rounds`` times after a warm-up call each. Prints ms per decode step of the whole batch (min and
median) and, with ``--out``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from soljax.compress.targets import as_targets
from soljax.data.blocks import load_token_ids
from soljax.engine.episodes import round_up, run_episode, start
from soljax.runs import controlled_model, load_lm, run_config

STRIDE = 9000  # tokens between the rows' windows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=4000)
    ap.add_argument("--target", default="0.2,0.7,0.45")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    B, C = args.batch, args.context
    cfg, params, tok = load_lm(run_config(args.run))
    ids = np.asarray(load_token_ids("eval", tok), np.int32)
    target = tuple(float(v) for v in args.target.split(","))
    rows = []
    for controller in ("fixed", "policy"):
        model = controlled_model(cfg, params, args.run, controller=controller)
        T = model.episode_len
        if (B - 1) * STRIDE + C + T > len(ids):
            raise SystemExit(f"the eval text has {len(ids)} tokens: too few for {B} windows of {C} + {T}")
        prompts = np.stack([ids[i * STRIDE:i * STRIDE + C] for i in range(B)])
        nexts = jnp.asarray(np.stack([ids[i * STRIDE + C:i * STRIDE + C + T] for i in range(B)]))
        state0 = start(cfg, model.scfg, params, jnp.asarray(prompts), jnp.full((B,), C, jnp.int32),
                       round_up(C + T, 64), jax.random.PRNGKey(0))
        targets = as_targets(target, B)
        ctrl_params = model.params_for(targets)
        force, counted = jnp.ones((B, T), bool), jnp.full((B,), T, jnp.int32)
        paths = {"fast": model.fast_for(B), "masked": None}

        def episode(fast, state):  # the episode donates its state: each call gets a fresh copy
            return run_episode(cfg, model.scfg, params, model.controller, ctrl_params, jnp.asarray(targets), state,
                               nexts, force, counted, steps=T, fast=fast)

        times = {name: [] for name in paths}
        for name, fast in paths.items():
            jax.block_until_ready(episode(fast, jax.tree.map(jnp.copy, state0)))  # compiles
        for _ in range(args.rounds):
            for name, fast in paths.items():
                state = jax.block_until_ready(jax.tree.map(jnp.copy, state0))
                t0 = time.perf_counter()
                jax.block_until_ready(episode(fast, state))
                times[name].append((time.perf_counter() - t0) * 1000.0 / T)
        for name, ms in times.items():
            rows.append({"controller": controller, "path": name, "ms_per_step_min": round(min(ms), 1),
                         "ms_per_step_median": round(float(np.median(ms)), 1)})
            print(f"batch {B} x {C} tokens  {controller:6s} {name:6s}  ms per step: min {min(ms):7.1f}  "
                  f"median {np.median(ms):7.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": B, "context": C, "target": target, "device": str(jax.devices()[0]), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
