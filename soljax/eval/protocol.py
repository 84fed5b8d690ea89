"""``soljax eval ppl --protocol paper``: the paper's perplexity protocol as a preset.

What the reference's ``eval_perplexity.sh`` and its Pareto reruns do, on the sweep machinery of
:mod:`soljax.eval.sweep`:

* data: WikiText-2 validation read as the reference reads it (:mod:`soljax.data.rows`: the first
  2,000 rows, empty rows skipped, tokenized without special tokens, concatenated, cut into blocks of
  ``M + T + 1``), the first 7 batches of 16 blocks, unshuffled; or any local text or dataset
  directory read the same way (the report then says it is not WikiText-2);
* ``M`` (the dense prefix) is the run's training ``context_len`` (the reference evaluates with the
  checkpoint's own M: 1,024 for its 1B configs, 512 for 3B/8B) unless ``prefix`` overrides it;
  ``T`` is the run's rollout length; the LM runs in bfloat16;
* the target grid is every combination of the reference's per-axis target levels (token keep
  0.15, 0.25 ... 0.95; MLP-input keep 0.4, 0.5 ... 1.0; bits 5 ... 13), each axis restricted to the
  range both the run's action grid and its training budgets cover (:func:`paper_levels`);
* scan: at every target the greedy policy runs and the fixed allocation is matched to its realized
  usage; dense and the paper's static single-axis points (Quest 30/50%, TEAL 60/80%, ZeroQuant 5/8
  bits) run once;
* rerun: the targets of the policy's Pareto front (perplexity vs realized net keep), subsampled
  evenly by net keep to at most ``front_points`` (the reference reran 8 with 30 random trials), are
  evaluated again with ``trials`` random schedules matched to the policy's realized usage; the best
  of them is an oracle chosen on the evaluation data itself.

Everything a CPU-sized run changes (batches, batch size, rows, prefix, dtype, a subsampled grid,
trials) is an explicit setting, and the record lists every departure from the paper's protocol.
Outputs: ``scan/sweep.json``, ``front/sweep.json`` (with their CSVs) and ``protocol.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from soljax.compress.actions import AXES
from soljax.config import TrainConfig, action_grid
from soljax.control import axis_levels
from soljax.data.rows import MAX_ROWS, eval_batches, read_rows, tokenize_rows
from soljax.errors import SoljaxError
from soljax.eval.sweep import Sweep, SweepConfig, write_sweep
from soljax.plots import pareto_front

#: The reference's per-axis target levels (eval_perplexity.sh): token keep, MLP-input keep, bits.
PAPER_LEVELS = (tuple(round(0.15 + 0.1 * i, 2) for i in range(9)), tuple(round(0.4 + 0.1 * i, 1) for i in range(7)),
                tuple(b / 16 for b in range(5, 14)))
#: The static single-axis baselines the paper annotates on its Pareto figure.
PAPER_STATIC = ("quest:0.3", "quest:0.5", "teal:0.6", "teal:0.8", "zeroquant:5", "zeroquant:8")
PAPER_BATCHES, PAPER_BATCH_SIZE, PAPER_DTYPE, PAPER_TRIALS, PAPER_FRONT_POINTS = 7, 16, "bfloat16", 30, 8
GRID_RULE = ("each axis keeps the reference's target levels that lie within both the run's action grid (its "
             "lowest to highest level) and its training budget range (list, uniform range or constant); an axis "
             "with no such level (a single-level axis) is held at the top of that range")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperConfig:
    """Settings of the paper protocol; the defaults are the paper's. ``data``: None for WikiText-2
    validation, else a local text file, dataset directory, corpus name or ``hf:`` source;
    ``prefix``: the dense prefix M (None: the run's training ``context_len``); ``batches`` of
    ``batch_size`` unshuffled blocks; ``rows``: the row cap; ``dtype`` of the LM; ``grid_points``:
    evaluate only this many grid targets, spread evenly over the nominal net keep (None: all);
    ``front_points``: front targets rerun with ``trials`` random schedules; ``seed`` of the random
    schedules."""

    data: str | None = None
    prefix: int | None = None
    batches: int = PAPER_BATCHES
    batch_size: int = PAPER_BATCH_SIZE
    rows: int = MAX_ROWS
    dtype: str = PAPER_DTYPE
    trials: int = PAPER_TRIALS
    grid_points: int | None = None
    front_points: int = PAPER_FRONT_POINTS
    seed: int = 0

    def __post_init__(self):
        for name in ("batches", "batch_size", "rows", "trials", "front_points", "prefix", "grid_points"):
            v = getattr(self, name)
            if v is None and name in ("prefix", "grid_points"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SoljaxError(f"{name.replace('_', ' ')} must be a positive integer, got {v!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise SoljaxError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SoljaxError(f"seed must be a non-negative integer, got {self.seed!r}")


def axis_range(cfg: TrainConfig, axis: str) -> tuple[float, float]:
    """The usage range an axis's targets may take: the run's action grid range intersected with its
    training budget range (the grid's range alone when they do not meet)."""
    levels = axis_levels(action_grid(cfg))[AXES.index(axis)]
    _, values = cfg.budget_sampler(axis)
    lo, hi = max(float(levels.min()), min(values)), min(float(levels.max()), max(values))
    return (lo, hi) if lo <= hi + 1e-6 else (float(levels.min()), float(levels.max()))


def paper_levels(cfg: TrainConfig) -> tuple[tuple[float, ...], ...]:
    """Per axis (token, prune, quant ratio), the reference's target levels the run allows (:data:`GRID_RULE`)."""
    out = []
    for axis, ref in zip(AXES, PAPER_LEVELS):
        lo, hi = axis_range(cfg, axis)
        inside = tuple(float(v) for v in ref if lo - 1e-6 <= v <= hi + 1e-6)
        out.append(inside or (round(hi, 6),))
    return tuple(out)


def paper_grid(levels: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, float, float], ...]:
    """Every combination of the per-axis levels (token outer, quant inner)."""
    return tuple(tuple(map(float, t)) for t in itertools.product(*levels))


def spread(values, n: int | None) -> list[int]:
    """Indices of at most ``n`` of ``values``, evenly spaced in the order of ``values`` (ties kept in
    order), always including the lowest and highest; all of them when ``n`` is None or large enough."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    if n is None or n >= len(order):
        return order
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, n)).astype(int))
    return [order[i] for i in picks]


def front_targets(scan: dict, n: int) -> list[int]:
    """Sweep indices of the policy's Pareto-optimal targets in ``scan``, at most ``n`` of them spread
    evenly over the realized net keep."""
    front = pareto_front([p for p in scan["points"] if p["method"] == "policy"])
    keep = spread([p["net_keep"] for p in front], n)
    return sorted(front[i]["sweep"] for i in keep)


def departures(pc: PaperConfig, *, wikitext2: bool, prefix: int, train_prefix: int, dtype: str, batches: int,
               grid_size: int, scanned: int) -> list[str]:
    """Every way this evaluation differs from the paper's protocol, in words."""
    out = []
    if not wikitext2:
        out.append("the data is not WikiText-2 validation")
    if pc.rows != MAX_ROWS:
        out.append(f"the first {pc.rows} rows are read, not {MAX_ROWS}")
    if prefix != train_prefix:
        out.append(f"the dense prefix is M = {prefix}, not the run's training M = {train_prefix}")
    if (batches, pc.batch_size) != (PAPER_BATCHES, PAPER_BATCH_SIZE):
        out.append(f"{batches} batch(es) of {pc.batch_size} blocks, not {PAPER_BATCHES} of {PAPER_BATCH_SIZE}"
                   + (f" ({pc.batches} requested, the text has fewer)" if batches < pc.batches else ""))
    if dtype != PAPER_DTYPE:
        out.append(f"the LM runs in {dtype}, not {PAPER_DTYPE}")
    if scanned < grid_size:
        out.append(f"{scanned} of the {grid_size} grid targets are evaluated (spread evenly over nominal net keep)")
    if pc.trials != PAPER_TRIALS:
        out.append(f"{pc.trials} random trials per front target, not {PAPER_TRIALS} (the reference's 30-trial "
                   f"reruns; it also ran 500)")
    if pc.front_points != PAPER_FRONT_POINTS:
        out.append(f"at most {pc.front_points} front targets are rerun, not {PAPER_FRONT_POINTS}")
    return out


def paper_sweeps(lm: tuple, train_cfg: TrainConfig, policy_vars: dict, pc: PaperConfig, *,
                 progress: bool = True) -> dict:
    """Runs the protocol on a loaded LM ``(cfg, params, tokenizer)``; returns
    ``{"protocol": record, "scan": sweep, "front": sweep}``."""
    lm_cfg, _, tokenizer = lm
    M, T = pc.prefix or train_cfg.context_len, train_cfg.rollout_len
    if M + T + 1 > lm_cfg.max_position_embeddings:
        raise SoljaxError(f"a block of prefix M = {M} + rollout T = {T} + 1 = {M + T + 1} tokens exceeds the model's "
                          f"maximum context ({lm_cfg.max_position_embeddings} positions): pass --prefix N with N <= "
                          f"{lm_cfg.max_position_embeddings - T - 1}")
    cfg = train_cfg.replace(context_len=M)
    text = read_rows(pc.data, max_rows=pc.rows)
    ids = tokenize_rows(tokenizer, text.rows)
    blocks = eval_batches(ids, M + T + 1, pc.batch_size, pc.batches)
    levels = paper_levels(train_cfg)
    grid = paper_grid(levels)
    scan_targets = tuple(grid[i] for i in sorted(spread([float(np.mean(t)) for t in grid], pc.grid_points)))
    base = SweepConfig(targets=scan_targets, data=text.source, num_blocks=len(blocks), batch_size=pc.batch_size,
                       random_trials=1, methods=("policy", "fixed", "dense", "static"), static=PAPER_STATIC,
                       seed=pc.seed)
    scan = Sweep(lm, cfg, policy_vars, base).run(blocks, progress=progress)
    chosen = front_targets(scan, pc.front_points)
    rerun = dataclasses.replace(base, targets=tuple(scan_targets[i] for i in chosen), random_trials=pc.trials,
                                methods=("policy", "fixed", "random"))
    front = Sweep(lm, cfg, policy_vars, rerun).run(blocks, progress=progress)
    batches = len(blocks) // pc.batch_size
    record = {
        "protocol": "paper",
        "settings": dataclasses.asdict(pc),
        "data": {"source": text.source, "description": text.description, "wikitext2": text.wikitext2,
                 "rows_cap": pc.rows, "rows_read": text.rows_read, "rows_nonempty": len(text.rows),
                 "tokens": int(len(ids)), "blocks_available": int(len(ids) // (M + T + 1)),
                 "blocks": int(len(blocks)), "batches": batches, "batch_size": pc.batch_size},
        "prefix": M, "train_context_len": train_cfg.context_len, "rollout_len": T, "block_len": M + T + 1,
        "dtype": lm_cfg.dtype,
        "grid": {"rule": GRID_RULE, "levels": {a: list(lv) for a, lv in zip(AXES, levels)},
                 "size": len(grid), "scanned": len(scan_targets), "targets": [list(t) for t in scan_targets]},
        "front": {"scan_front_size": len(pareto_front([p for p in scan["points"] if p["method"] == "policy"])),
                  "scan_sweeps": chosen, "trials": pc.trials},
        "static": list(PAPER_STATIC),
        "departures": departures(pc, wikitext2=text.wikitext2, prefix=M, train_prefix=train_cfg.context_len,
                                 dtype=lm_cfg.dtype, batches=batches, grid_size=len(grid),
                                 scanned=len(scan_targets)),
    }
    return {"protocol": record, "scan": scan, "front": front}


def write_paper(result: dict, out_dir: str | Path) -> Path:
    """Writes ``protocol.json``, ``scan/`` and ``front/`` (sweep JSON and CSV) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_sweep(result["scan"], out / "scan")
    write_sweep(result["front"], out / "front")
    (out / "protocol.json").write_text(json.dumps(result["protocol"], indent=1))
    return out


def eval_paper(run_dir: str | Path, pc: PaperConfig, out_dir: str | Path | None = None, *,
               lm: tuple | None = None, progress: bool = True) -> dict:
    """Loads the run's policy and its LM in ``pc.dtype`` (or uses ``lm``), runs the paper protocol and
    writes it into ``out_dir`` (default ``RUN/eval_paper``)."""
    from soljax.runs import checkpoint_steps, load_lm, load_policy

    train_cfg, policy_vars = load_policy(run_dir)
    if lm is None:
        lm = load_lm(train_cfg, dtype=pc.dtype)
    result = paper_sweeps(lm, train_cfg, policy_vars, pc, progress=progress)
    result["protocol"]["run_dir"] = str(run_dir)
    result["protocol"]["checkpoint"] = checkpoint_steps(run_dir)[-1]
    for part in ("scan", "front"):
        result[part]["run_dir"] = str(run_dir)
        result[part]["checkpoint"] = result["protocol"]["checkpoint"]
    write_paper(result, out_dir or Path(run_dir) / "eval_paper")
    return result
