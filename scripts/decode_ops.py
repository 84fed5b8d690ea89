"""Op by op: where one serving episode's time goes, from an XLA profiler trace, at batch 1.

    python scripts/decode_ops.py --run runs/demo [--context 8000] [--target 0.2,0.7,0.45] [--impl cpu]
                                 [--controller policy] [--no-replay] [--top 40] [--out ops.json]

On a training run's LM, after a dense prefill of ``context`` tokens of the eval split, it runs one
episode of T teacher-forced tokens on the serving path (:func:`soljax.engine.episodes.run_episode`
on the fast decode path: T controlled steps, the controller, the page summaries and the dense
replay) with ``--controller`` at ``--target``, and the same T tokens on the LM's dense decoder.
After a warm-up call, ``--calls`` calls of each are traced with ``jax.profiler`` and every XLA op's
time is summed by its HLO name, in ms per decoded token (the op's total / calls / T), with how
many times it ran per token. ``cond`` and ``while`` rows include the ops they run (the per-layer
``lax.switch`` branches and loops), so rows overlap; the wall time per token is printed first.

Prints the two tables and, with ``--out``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from soljax.compress.targets import as_targets
from soljax.data.blocks import load_token_ids
from soljax.engine.episodes import round_up, run_episode, start
from soljax.runs import controlled_model, load_lm, run_config
from soljax.tools.bench_decode import dense_chunk

HLO_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.[0-9a-z]+)*$")  # fusion.12, cond.14.clone.2, dot.223, copy


def traced_ops(fn, states: list, T: int) -> dict:
    """Wall ms per token (median of the traced calls) and the XLA ops' ms per token of ``fn(state)``
    over ``states`` (one fresh state per call: the calls donate it)."""
    times = []
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for s in states:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(s))
                times.append(time.perf_counter() - t0)
        trace = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and HLO_NAME.match(e["name"]):
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    n = len(states) * T
    ops = [{"op": name, "ms_per_token": round(us / 1000.0 / n, 3), "runs_per_token": round(count[name] / n, 2)}
           for name, us in total.most_common()]
    return {"wall_ms_per_token": round(1000.0 * float(np.median(times)) / T, 2), "ops": ops}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--target", default="0.2,0.7,0.45")
    ap.add_argument("--controller", default="policy", choices=("policy", "fixed", "dense"))
    ap.add_argument("--impl", help="the fast path's ops (default: the run's; cpu: the C++ kernels)")
    ap.add_argument("--no-replay", action="store_true", help="episodes keep their compressed K/V entries")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    cfg, params, tok = load_lm(run_config(args.run))
    model = controlled_model(cfg, params, args.run, controller=args.controller, impl=args.impl,
                             replay=not args.no_replay)
    T, C = model.episode_len, args.context
    ids = np.asarray(load_token_ids("eval", tok)[: C + T], np.int32)
    state0 = start(cfg, model.scfg, params, jnp.asarray(ids[None, :C]), jnp.asarray([C], jnp.int32),
                   round_up(C + T, 64), jax.random.PRNGKey(0))
    nexts, inputs = jnp.asarray(ids[None, C:C + T]), jnp.asarray(ids[C - 1:C - 1 + T])
    target = as_targets(tuple(float(v) for v in args.target.split(",")), 1)
    ctrl = model.params_for(target)
    force, counted = jnp.ones((1, T), bool), jnp.full((1,), T, jnp.int32)
    runs = {
        f"episode: {args.controller} @ {args.target}": (
            lambda s: run_episode(cfg, model.scfg, params, model.controller, ctrl, jnp.asarray(target), s, nexts,
                                  force, counted, steps=T, fast=model.fast,
                                  replay=model.replay), lambda: state0),
        "dense decode (the LM's decode_step)": (
            lambda c: dense_chunk(cfg, params, c, inputs, nexts[0]), lambda: state0.cache),
    }
    result = {"context": C, "horizon": T, "device": str(jax.devices()[0]), "runs": {}}
    for name, (fn, source) in runs.items():
        fresh = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, source()))  # noqa: E731
        jax.block_until_ready(fn(fresh()))  # compile and warm up
        res = traced_ops(fn, [fresh() for _ in range(args.calls)], T)
        res["ops"] = res["ops"][: args.top]
        result["runs"][name] = res
        print(f"{name}: {res['wall_ms_per_token']:.1f} ms/token (wall)", file=sys.stderr)
        for o in res["ops"]:
            print(f"  {o['ms_per_token']:8.2f} ms  x{o['runs_per_token']:<7g} {o['op']}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
