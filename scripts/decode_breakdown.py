"""Where a controlled decode step's time goes on this machine, component by component, at batch 1.

    python scripts/decode_breakdown.py --run runs/demo [--context 8000] [--out breakdown.json]

On a training run's LM, after a dense prefill of ``context`` tokens of the eval split, it times
(the fastest of ``--calls`` compiled calls after one warm-up, in ms per decoded token):

* ``dense decode``: the plain dense decode step (what ``soljax bench decode`` calls dense);
* ``fast step @ LEVEL``: one :func:`soljax.lm.fast_step.fast_step` call with every axis dense
  except the one named, for each level of the run's grid on that axis: the attention at each
  token keep (page scoring, union, gather), the MLP at each input keep (masked, and gathered
  rows), the fake quantizer at each width;
* ``episode: X``: :func:`soljax.engine.episodes.run_episode` per token on the fast path (all its
  work: the T controlled steps, the controller, the page summaries and the dense replay) for the
  dense controller, the fixed schedule at each target, the policy at each target, and the policy's
  own actions replayed as given actions (the same LM work without the policy network: the
  difference is the policy's cost), and the policy without the dense replay;
* ``page summaries`` and ``dense replay``: the two per-episode passes, per token (divided by the
  horizon T): summarizing the pages the replay wrote, and the replay over the prefix.

Prints a table and, with ``--out``, writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from soljax.compress.targets import as_targets
from soljax.control.given import GivenActions
from soljax.data.blocks import load_token_ids
from soljax.engine.episodes import ControlledModel, round_up, run_episode, start
from soljax.lm import model as lm
from soljax.lm.controlled import Controls, SuffixCache, refresh_page_summaries_of, shared_prefix_from_cache
from soljax.lm.fast_step import FastPath, fast_step
from soljax.runs import controlled_model, load_lm, run_config
from soljax.tools.bench_decode import DEFAULT_TARGETS, dense_chunk


def fastest_ms(fn, calls: int) -> float:
    """Fastest wall ms of ``fn()`` over ``calls`` calls after one warm-up call (the steady cost:
    on a shared 2-core machine single calls vary by up to 20%, and interference only adds time)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.min(times))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    cfg, params, tok = load_lm(run_config(args.run))
    policy = controlled_model(cfg, params, args.run, controller="policy")
    fixed = controlled_model(cfg, params, args.run, controller="fixed")
    dense_model = controlled_model(cfg, params, args.run, controller="dense")
    scfg, T, levels = policy.scfg, policy.episode_len, policy.fast.levels
    C = args.context
    ids = np.asarray(load_token_ids("eval", tok)[: C + 2 * T], np.int32)
    capacity = round_up(C + 2 * T, 64)
    state0 = start(cfg, scfg, params, jnp.asarray(ids[None, :C]), jnp.asarray([C], jnp.int32), capacity,
                   jax.random.PRNGKey(0))
    nexts = jnp.asarray(ids[None, C:C + T])
    rows: list[dict] = []

    def add(name: str, ms_per_token: float, **extra) -> None:
        rows.append({"component": name, "ms_per_token": round(ms_per_token, 2), **extra})
        print(f"{name:<44} {ms_per_token:8.2f} ms/token", file=sys.stderr, flush=True)

    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 (the jitted calls donate their state)
    inputs = jnp.asarray(ids[C - 1:C - 1 + T])
    add("dense decode", fastest_ms(lambda: dense_chunk(cfg, params, copy(state0.cache), inputs, nexts[0]), args.calls)
        / T)

    # one fast step per level, the other axes dense
    prefix = jax.jit(shared_prefix_from_cache, static_argnums=0)(scfg, state0.cache)
    tokens = jnp.asarray(ids[None, C - 1:C])  # [1, 1]

    def step_ms(kappa: float, rho: float, bits: int, path: FastPath) -> float:
        controls = Controls(jnp.full((1, 1), kappa, jnp.float32), jnp.full((1, 1), rho, jnp.float32),
                            jnp.full((1, 1), bits, jnp.int32))
        return fastest_ms(lambda: fast_step(cfg, scfg, path, params, prefix, SuffixCache.empty(cfg, 1, 1, T), tokens,
                                           controls), args.calls)

    masked, gathered = policy.fast, FastPath(levels, mlp="gather", attention_impl=policy.fast.attention_impl)
    add("fast step, all dense", step_ms(1.0, 1.0, 16, masked))
    for kappa in levels.keep[:-1]:
        add(f"fast step @ token keep {kappa:.2f}", step_ms(kappa, 1.0, 16, masked))
    for rho in levels.rho[:-1]:
        add(f"fast step @ MLP keep {rho:.2f} (masked)", step_ms(1.0, rho, 16, masked))
        add(f"fast step @ MLP keep {rho:.2f} (gathered rows)", step_ms(1.0, rho, 16, gathered))
    for bits in levels.bits[:-1]:
        add(f"fast step @ {bits} bits", step_ms(1.0, 1.0, bits, masked))

    # the per-episode passes over the prefix, returning only what they compute (inside an episode
    # the cache is neither copied nor returned): the page summaries of the pages the replay wrote,
    # and the replay
    refresh = jax.jit(lambda s, cache: refresh_page_summaries_of(scfg, s, cache, cache.lengths - T, T),
                      donate_argnums=0)  # in place, as inside an episode
    summaries = [copy(state0.summaries)]

    def refreshed():
        summaries[0] = refresh(summaries[0], state0.cache)  # the same pages again: the same values
        return summaries[0]

    add("page summaries (per episode / T)", fastest_ms(refreshed, args.calls) / T)
    replay = jax.jit(lambda p, cache, toks: lm.extend(cfg, p, cache, toks)[0])
    add("dense replay (per episode / T)", fastest_ms(lambda: replay(params, state0.cache, nexts), args.calls) / T)

    # whole episodes on the serving path
    force, counted = jnp.ones((1, T), bool), jnp.full((1,), T, jnp.int32)

    def episode(model: ControlledModel, target, ctrl_params=None, replay=True):
        targets = as_targets(target, 1)
        cp = model.params_for(targets) if ctrl_params is None else ctrl_params
        return lambda: run_episode(cfg, scfg, params, model.controller, cp, jnp.asarray(targets), copy(state0), nexts,
                                   force, counted, steps=T, fast=model.fast, replay=replay)

    add("episode: dense controller", fastest_ms(episode(dense_model, (1.0, 1.0, 1.0)), args.calls) / T)
    given = ControlledModel(cfg, params, scfg, GivenActions(grid=policy.controller.grid), None, T, fast=policy.fast)
    for target in DEFAULT_TARGETS:
        label = "/".join(f"{v:.2f}" for v in target)
        add(f"episode: fixed @ {label}", fastest_ms(episode(fixed, target), args.calls) / T)
        add(f"episode: policy @ {label}", fastest_ms(episode(policy, target), args.calls) / T)
        add(f"episode: policy without the replay @ {label}",
            fastest_ms(episode(policy, target, replay=False), args.calls) / T)
        _, out = episode(policy, target)()
        actions = jnp.asarray(out.actions)[:, None, :]  # [1, 1, T]
        add(f"episode: policy's actions given @ {label}", fastest_ms(episode(given, target, actions), args.calls) / T,
            usage=np.asarray(out.usage[0]).mean(0).round(3).tolist())
    result = {"context": C, "horizon": T, "device": str(jax.devices()[0]), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
