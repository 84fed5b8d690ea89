"""``soljax bench decode``: end-to-end decoding time and quality with the controller in the loop.

One prompt at a time (batch 1) on a training run's LM, for each context length: the first
``context`` tokens of real text (default the eval split) are prefilled once, then the next tokens
are decoded teacher-forced (so every method decodes the same tokens) by

* ``dense``: the plain dense decoder (:func:`soljax.lm.model.decode_step`, no episodes);
* ``fixed``: the run grid's budget-matched fixed schedule at each target;
* ``policy``: the run's policy (greedy actions) at each target;

the last two on the serving path: episodes of the run's horizon T with dense replay between them
(:mod:`soljax.engine.episodes`), each step on the fast decode path (:mod:`soljax.lm.fast_step`),
or on the masked step for the ``*-masked`` methods (``masked=True``), or without the dense replay
for the ``*-noreplay`` methods (``no_replay=True``: the cache keeps each episode's compressed
entries). Every timing includes everything the serving loop does per token: the controller's step
(observation, hidden state, policy network), the LM step, the episode's page summaries and, unless
skipped, its dense replay. With an ``impl`` override (``--impl``, e.g. ``cpu``: the C++ kernels
for attention, MLP and replay) the fast path runs those ops, and ``dense-fast`` adds the dense
controller on that fast path without replay, i.e. the dense decoder of those ops.

Timing: each compiled call decodes T tokens (one episode, or T dense steps); its wall time / T is
one sample of ms per token. The methods take turns, call by call (each on its own copy of the
prefilled state), so a machine that slows down or speeds up during the run does so for every row
alike. The first call (compilation, warm-up) is dropped; ``ms_per_token`` is the median over the
remaining calls (``tokens`` decoded tokens, rounded up to whole calls).
``speedup`` is dense ms / the method's ms in the same run. ``usage`` is the realized mean usage
per axis over the timed steps (token keep, MLP-input keep / rho_max, bits / 16), ``net_keep`` their
mean; ``nll`` the mean negative log-likelihood (nats) of the timed tokens under that controller.

:func:`run_bench_decode_shape` (``soljax bench decode --shape NAME``) times the same loop on a
model of a named shape (:mod:`soljax.tools.shapes`, e.g. Llama-3.1-8B) with random weights and
random tokens, for models too large for this machine or not on it: the dense decoder against
constant controls on the fast path, with the XLA ops or the Pallas kernels. Only its times mean
something.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soljax.compress.targets import as_targets
from soljax.control.given import GivenControls, constant_controls
from soljax.engine.episodes import ControlledModel, round_up, run_episode, start
from soljax.errors import SoljaxError
from soljax.lm import model as lm
from soljax.lm.config import LMConfig
from soljax.lm.controlled import SparsityConfig
from soljax.lm.fast_step import FastPath, Levels
from soljax.lm.params import init_params
from soljax.serve.generate import realized_budget
from soljax.tools.bench_kernels import device_name

DEFAULT_CONTEXTS = (1024, 4096, 8000)
DEFAULT_TARGETS = ((0.6, 0.9, 0.75), (0.4, 0.8, 0.6), (0.2, 0.7, 0.45))
METHODS = ("dense", "fixed", "policy")
SHAPE_CONTEXTS = (32768,)
SHAPE_TARGETS = ((0.1, 1.0, 1.0), (0.1, 0.5, 1.0))  # token keep, MLP-input keep, bits / 16
SHAPE_HORIZON = 16  # decode steps per episode (the reference's rollout length)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def dense_chunk(cfg: LMConfig, params: dict, cache: lm.KVCache, inputs_t: jax.Array, targets_t: jax.Array):
    """T teacher-forced dense decode steps of one row: inputs ``[T]`` -> ``(cache, logp [T])`` of
    ``targets_t`` (the next tokens)."""
    def step(cache, tok_target):
        tok, target = tok_target
        logits, _, cache = lm.decode_step(cfg, params, cache, tok[None])
        return cache, jax.nn.log_softmax(logits[0])[target]

    return jax.lax.scan(step, cache, (inputs_t, targets_t))


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _row(context: int, method: str, target, usage: dict, times: list[float], logp: np.ndarray, T: int) -> dict:
    axes = [usage["token"], usage["prune"], usage["quant"]]
    return {"context": context, "method": method, "target": None if target is None else [float(v) for v in target],
            "usage": {k: float(v) for k, v in zip(("token", "prune", "quant"), axes)},
            "net_keep": float(np.mean(axes)), "ms_per_token": float(np.median(times)) * 1000.0 / T,
            "nll": float(-np.mean(logp)), "calls": len(times)}


class _DenseRun:
    """The dense decoder over the timed tokens, one call (T tokens) at a time."""

    def __init__(self, model: ControlledModel, state0, inputs: np.ndarray, nexts: np.ndarray, T: int):
        self.cfg, self.params, self.T = model.cfg, model.params, T
        self.cache, self.inputs, self.nexts = _copy(state0.cache), inputs, nexts
        self.times, self.logps = [], []

    def call(self, c: int) -> None:
        win = slice(c * self.T, (c + 1) * self.T)
        (self.cache, logp), s = _timed(lambda: dense_chunk(self.cfg, self.params, self.cache,
                                                           jnp.asarray(self.inputs[win]), jnp.asarray(self.nexts[win])))
        if c:  # the first call compiles (warm-up)
            self.times.append(s)
            self.logps.append(np.asarray(logp))

    def usage(self) -> dict:
        return {"token": 1.0, "prune": 1.0, "quant": 1.0}


class _ControlledRun:
    """A controller's serving episodes over the timed tokens, one call (one episode) at a time."""

    def __init__(self, model: ControlledModel, state0, nexts: np.ndarray, target):
        self.model, self.nexts, self.T = model, nexts, model.episode_len
        targets_b3 = as_targets(target, 1)
        self.targets_b3, self.ctrl_params = jnp.asarray(targets_b3), model.params_for(targets_b3)
        self.force, self.counted = jnp.ones((1, self.T), bool), jnp.full((1,), self.T, jnp.int32)
        self.state = _copy(state0)
        self.times, self.logps, self.applied, self.effective = [], [], [], []

    def call(self, e: int) -> None:
        m, T = self.model, self.T
        forced = jnp.asarray(self.nexts[None, e * T:(e + 1) * T])
        (self.state, out), s = _timed(lambda: run_episode(
            m.cfg, m.scfg, m.params, m.controller, self.ctrl_params, self.targets_b3, self.state, forced,
            self.force, self.counted, steps=T, fast=m.fast_for(1), replay=m.replay))
        if e:
            self.times.append(s)
            self.logps.append(np.asarray(out.logprobs[0]))
            self.applied.append(np.asarray(out.usage[0]))
            self.effective.append(np.asarray(out.effective[0]))

    def usage(self) -> dict:
        return realized_budget(np.concatenate(self.applied), np.concatenate(self.effective))


def bench_decode(models: dict[str, ControlledModel], ids: np.ndarray, *, contexts: Sequence[int] = DEFAULT_CONTEXTS,
                 tokens: int = 64, targets=DEFAULT_TARGETS, masked: bool = False, no_replay: bool = False,
                 dense_fast: ControlledModel | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """The benchmark rows (see the module docstring) for ``models`` (``fixed`` and/or ``policy``
    :class:`ControlledModel` of one run, same LM and horizon) over token ids ``ids`` of real text.
    ``dense_fast``: a dense controller on the fast path, timed once as the ``dense-fast`` row (the
    dense decoder of that path's attention, e.g. the C++ kernel's)."""
    if not models:
        raise SoljaxError("give at least one controlled model (fixed or policy)")
    first = next(iter(models.values()))
    cfg, params, T = first.cfg, first.params, first.episode_len
    if tokens < 1 or not contexts or min(contexts) < 2:
        raise SoljaxError("bench decode needs tokens >= 1 and contexts of at least 2 tokens")
    n = -(-tokens // T) * T + T  # timed tokens in whole calls, plus one warm-up call
    rows = []
    for context in contexts:
        if context + n > cfg.max_position_embeddings:
            raise SoljaxError(f"context {context} plus {n} decoded tokens (warm-up included) exceed the model's "
                              f"{cfg.max_position_embeddings} positions: use a shorter context or fewer tokens")
        if context + n > len(ids):
            raise SoljaxError(f"the text has {len(ids)} tokens, fewer than context {context} plus {n} decoded")
        prompt = np.asarray(ids[:context], np.int32)
        nexts = np.asarray(ids[context:context + n], np.int32)
        inputs = np.concatenate([prompt[-1:], nexts[:-1]])
        if progress:
            progress(f"context {context}: prefill")
        capacity = round_up(context + n, 64)
        state0 = start(cfg, first.scfg, params, jnp.asarray(prompt[None]), jnp.asarray([context], jnp.int32),
                       capacity, jax.random.PRNGKey(0))
        runs = {("dense", None): _DenseRun(first, state0, inputs, nexts, T)}
        if dense_fast is not None:
            runs[("dense-fast", None)] = _ControlledRun(dense_fast, state0, nexts, (1.0, 1.0, 1.0))
        for name, model in models.items():
            variants = {name: model}
            if masked:  # the same decisions on the masked step
                variants[f"{name}-masked"] = dataclasses.replace(model, fast=None)
            if no_replay:
                variants[f"{name}-noreplay"] = dataclasses.replace(model, replay=False)
            for method, variant in variants.items():
                for target in targets:
                    runs[(method, tuple(target))] = _ControlledRun(variant, state0, nexts, target)
        del state0
        for c in range(n // T):  # call c of every method, then call c + 1: drift hits every row alike
            if progress:
                progress(f"context {context}: call {c + 1} of {n // T} of each of the {len(runs)} methods"
                         + (" (compiling)" if c == 0 else ""))
            for run in runs.values():
                run.call(c)
        here = [_row(context, method, target, run.usage(), run.times, np.concatenate(run.logps), T)
                for (method, target), run in runs.items()]
        for r in here:  # here[0] is dense
            r["speedup"] = here[0]["ms_per_token"] / r["ms_per_token"]
        rows += here
        del runs
    return {"device": device_name(), "rows": rows}


def run_bench_decode(run_dir: str | Path, *, contexts: Sequence[int] = DEFAULT_CONTEXTS, tokens: int = 64,
                     targets=DEFAULT_TARGETS, data: str = "eval", methods: Sequence[str] = ("fixed", "policy"),
                     masked: bool = False, no_replay: bool = False, model_dir: str | Path | None = None,
                     impl: str | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """:func:`bench_decode` of a training run's LM, fixed schedule and policy on ``data`` (a split
    or a text file). ``impl``: overrides the run's attention and MLP implementations (e.g. ``cpu``,
    the C++ kernels); the dense controller on that fast path (without replay) is then timed too, as
    ``dense-fast``."""
    from soljax.data.blocks import load_token_ids
    from soljax.runs import controlled_model, load_lm, run_config

    unknown = set(methods) - {"fixed", "policy"}
    if unknown:
        raise SoljaxError(f"unknown bench decode method(s) {sorted(unknown)} (expected fixed, policy)")
    cfg, params, tok = load_lm(run_config(run_dir), model_dir=model_dir)
    models = {m: controlled_model(cfg, params, run_dir, controller=m, impl=impl) for m in methods}
    dense_fast = None if impl is None else controlled_model(cfg, params, run_dir, controller="dense", replay=False,
                                                            impl=impl)
    ids = load_token_ids(data, tok)
    return bench_decode(models, ids, contexts=contexts, tokens=tokens, targets=targets, masked=masked,
                        no_replay=no_replay, dense_fast=dense_fast, progress=progress)


def shape_models(cfg: LMConfig, params: dict, targets, impls: Sequence[str] = ("xla",), *, page_size: int = 16,
                 episode_len: int = SHAPE_HORIZON) -> dict[str, ControlledModel]:
    """Constant-controls models on the fast path, one per impl: ``xla`` (page gathers; the MLP
    gathers its kept rows on accelerators and stays masked on CPU, where gathers cost more than
    they save), ``pallas`` (both Pallas kernels; interpreted on CPU) or ``cpu`` (the C++ kernels)."""
    cpu = jax.default_backend() == "cpu"
    levels = Levels.of(*zip(*[(t, p, int(np.rint(16 * q))) for t, p, q in targets]))
    models = {}
    for impl in impls:
        pallas = impl == "pallas"
        scfg = SparsityConfig(page_size=page_size, attention_impl=impl, mlp_impl=impl, kernel_interpret=pallas and cpu)
        mlp = impl if impl != "xla" else "masked" if cpu else "gather"
        path = FastPath(levels, mlp=mlp, attention_impl=impl, interpret=scfg.kernel_interpret)
        models[f"fast-{impl}"] = ControlledModel(cfg, params, scfg, GivenControls(), constant_controls(episode_len),
                                                 episode_len, fast=path)
    return models


def run_bench_decode_shape(shape: str, *, contexts: Sequence[int] = SHAPE_CONTEXTS, tokens: int = 32,
                           targets=SHAPE_TARGETS, impls: Sequence[str] = ("xla",), dtype: str | None = None,
                           masked: bool = False, no_replay: bool = False,
                           progress: Callable[[str], None] | None = None) -> dict:
    """:func:`bench_decode` of a model of a named shape with random weights (``dtype``: default
    bfloat16 on accelerators, float32 on CPU) on random tokens: the dense decoder against constant
    controls (each target ``t,p,q``: token keep t, MLP-input keep p, 16 q bits) on the fast path,
    per impl (:func:`shape_models`). The NLLs of random weights mean nothing; the times do."""
    from soljax.tools.shapes import shape_config

    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    cfg = shape_config(shape, dtype)
    if progress:
        progress(f"random {shape} weights ({dtype})")
    params = init_params(cfg, jax.random.PRNGKey(0))
    models = shape_models(cfg, params, targets, impls)
    n = max(contexts) + round_up(tokens, SHAPE_HORIZON) + SHAPE_HORIZON  # what bench_decode reads
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, n).astype(np.int32)
    result = bench_decode(models, ids, contexts=contexts, tokens=tokens, targets=targets, masked=masked,
                          no_replay=no_replay, progress=progress)
    return {**result, "shape": shape, "dtype": dtype}


def format_table(result: dict) -> str:
    """The rows as a text table."""
    lines = [f"device: {result['device']}",
             f"{'context':>7} {'method':>20} {'target t/p/q':>16} {'usage t/p/q':>17} {'net keep':>8} "
             f"{'ms/token':>9} {'speedup':>7} {'nll':>7}"]
    for r in result["rows"]:
        tgt = "-" if r["target"] is None else "/".join(f"{v:.2f}" for v in r["target"])
        use = "/".join(f"{r['usage'][a]:.2f}" for a in ("token", "prune", "quant"))
        lines.append(f"{r['context']:>7} {r['method']:>20} {tgt:>16} {use:>17} {r['net_keep']:>8.3f} "
                     f"{r['ms_per_token']:>9.2f} {r['speedup']:>7.2f} {r['nll']:>7.4f}")
    return "\n".join(lines)


def bench_decode_cli(args, say) -> None:
    """``soljax bench decode``: run, print (table or JSON), optionally plot."""
    import json

    from soljax.compress.targets import parse_targets
    from soljax.plots import plot_decode_time

    if bool(args.run) == bool(args.shape):
        raise SoljaxError("bench decode needs either --run RUN_DIR (a training run: its LM, grid and policy) or "
                          "--shape NAME (a model of that shape with random weights)")
    if args.shape:
        if args.plot:
            raise SoljaxError("--plot draws NLL against time, which random weights do not have: drop it with --shape")
        result = run_bench_decode_shape(args.shape, contexts=tuple(args.context or SHAPE_CONTEXTS), tokens=args.tokens,
                                        targets=parse_targets(args.targets) if args.targets else SHAPE_TARGETS,
                                        impls=tuple(args.impl or ("xla",)), dtype=args.dtype, masked=args.masked,
                                        no_replay=args.no_replay, progress=say)
    else:
        targets = parse_targets(args.targets) if args.targets else DEFAULT_TARGETS
        if args.impl and len(args.impl) > 1:
            raise SoljaxError("bench decode --run takes one --impl (the fast path's ops)")
        result = run_bench_decode(args.run, contexts=tuple(args.context or DEFAULT_CONTEXTS), tokens=args.tokens,
                                  targets=targets, data=args.data, masked=args.masked, no_replay=args.no_replay,
                                  impl=args.impl[0] if args.impl else None, progress=say)
    print(json.dumps(result) if args.json else format_table(result))
    if args.plot:
        plot_decode_time(result["rows"], Path(args.plot))
