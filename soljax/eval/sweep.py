"""Perplexity sweeps: a trained policy against budget-matched baselines on held-out blocks.

For every requested target triple (token keep, MLP-input keep, MLP-output bit ratio) the greedy
policy runs on every evaluation block; its *realized* average usage then becomes the target of each
baseline, so all methods are compared at the same realized budget (the reference's protocol):

* ``fixed``: uniform allocation, dithered between the two grid levels bracketing the target;
* ``random_best_of_N`` / ``random_mean``: N random two-level schedules per block that hit the
  target exactly (the trial with the lowest perplexity over all blocks, an oracle choice made on
  the evaluation data itself, and the mean over trials);
* ``emc`` / ``dac``: the entropy/margin and hidden-drift heuristics (:mod:`soljax.control.heuristics`);
* ``dense`` and static single-axis points (``quest@x``: token keep x only; ``teal@x``: MLP-input
  keep x only; ``zeroquant@b``: b-bit MLP output only), run once.

Everything runs on the rollout engine; each batch of blocks is prefilled once per pass and shared by
every controller and target. The policy and the heuristics choose their actions in their own
rollouts; then, per batch and target, one call scores every method's schedule side by side, so
the paired comparisons share their numerics exactly. Perplexity is over the T controlled tokens
of each block; ``ppl_ci`` is a 95% interval from the spread of the per-block mean NLL;
``block_nll`` keeps those means (in block order, the same blocks for every method) for paired
comparisons.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from soljax import parallel
from soljax.compress.actions import AXES, ActionGrid
from soljax.config import action_grid, check_episode_length, policy_config, sparsity_config
from soljax.control import (DriftController, EntropyMarginController, GivenActions, GivenControls, PolicyController,
                            axis_levels, block_phases, fixed_schedule, random_schedule)
from soljax.engine import episode_usage, prefill_blocks, rollout
from soljax.errors import SoljaxError
from soljax.lm.controlled import Controls

METHODS = ("policy", "fixed", "random", "emc", "dac", "dense", "static")
SPLITS = ("valid", "test")
#: The evaluation data's first blocks in the seed's shuffled order form the validation split.
VALID_BLOCKS = 64
STATIC_KINDS = {"quest": "token", "teal": "prune", "zeroquant": "quant"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """What a sweep evaluates: ``targets`` (token, prune, quant-ratio triples; empty = a default
    diagonal through the grid), the evaluation ``data`` source, ``num_blocks`` in batches of
    ``batch_size``, ``random_trials`` per target, the ``methods`` to run, ``static`` points
    (``"quest:0.3"``, ``"teal:0.6"``, ``"zeroquant:8"``; empty = one per non-top grid level),
    the heuristics' ``gamma``, the ``seed`` of the random schedules and block choice, ``guard``
    (the policy treats its targets as hard caps: see :class:`~soljax.control.PolicyController`) and
    the ``split``: the data's blocks are shuffled by ``seed``; the first :data:`VALID_BLOCKS` are
    ``valid`` (for choosing rewards, learning rates, targets...), ``test`` takes ``num_blocks`` of the
    blocks after them (for reporting: no choice ever looked at them)."""

    targets: tuple[tuple[float, float, float], ...] = ()
    data: str = "eval"
    num_blocks: int = 64
    batch_size: int = 8
    random_trials: int = 30
    methods: tuple[str, ...] = METHODS
    static: tuple[str, ...] = ()
    gamma: float = 0.35
    seed: int = 0
    guard: bool = False
    split: str = "test"

    def __post_init__(self):
        for name in ("num_blocks", "batch_size", "random_trials"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SoljaxError(f"{name} must be a positive integer, got {v!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise SoljaxError(f"unknown methods {bad} (choose from {', '.join(METHODS)})")
        for t in self.targets:
            if len(t) != 3 or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in t):
                raise SoljaxError(f"a target is three fractions in (0, 1] (token, prune, quant ratio), got {t!r}")
        for s in self.static:
            parse_static(s)
        if self.split not in SPLITS:
            raise SoljaxError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.split == "valid" and self.num_blocks > VALID_BLOCKS:
            raise SoljaxError(f"the valid split has {VALID_BLOCKS} blocks, got num_blocks={self.num_blocks}")
        if not isinstance(self.guard, bool):
            raise SoljaxError(f"guard must be true or false, got {self.guard!r}")
        if not 0 <= self.gamma <= 1:
            raise SoljaxError(f"gamma must lie in [0, 1], got {self.gamma!r}")


def parse_static(spec: str) -> tuple[str, float]:
    """``"quest:0.3"`` -> ``("quest", 0.3)``; ``zeroquant`` takes bits."""
    kind, _, value = spec.partition(":")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind not in STATIC_KINDS:
        raise SoljaxError(f"static point {spec!r}: kind must be one of {', '.join(STATIC_KINDS)}")
    ok = (2 <= v <= 16 and v == int(v)) if kind == "zeroquant" else (0 < v <= 1)
    if not ok:
        raise SoljaxError(f"static point {spec!r}: {'bits in 2..16' if kind == 'zeroquant' else 'a fraction in (0, 1]'}")
    return kind, v


def default_targets(grid: ActionGrid, points: int = 6) -> tuple[tuple[float, float, float], ...]:
    """Targets on the diagonal from each axis's lowest to highest level (net keep ~0.4 to ~0.9 on
    the two-level grids)."""
    lo_hi = [(float(lv.min()), float(lv.max())) for lv in axis_levels(grid)]
    fracs = np.linspace(0.1, 0.85, points)
    return tuple(tuple(round(lo + f * (hi - lo), 4) for lo, hi in lo_hi) for f in fracs)


def default_static(grid: ActionGrid) -> tuple[str, ...]:
    """One static point per lower grid level of each active axis."""
    out = []
    for (kind, axis), lv in zip(STATIC_KINDS.items(), axis_levels(grid)):
        for v in sorted(set(np.round(lv, 6)))[:-1]:
            out.append(f"{kind}:{int(round(v * 16)) if axis == 'quant' else round(float(v), 4)}")
    return tuple(out)


def static_controls(specs: tuple[str, ...], rho_max: float) -> tuple[list[str], np.ndarray]:
    """Names and ``[S, 3]`` (kappa, rho, bits) of dense plus each static point."""
    names, rows = ["dense"], [(1.0, rho_max, 16)]
    for s in specs:
        kind, v = parse_static(s)
        row = [1.0, rho_max, 16]
        row[list(STATIC_KINDS).index(kind)] = v
        names.append(f"{kind}@{int(v) if kind == 'zeroquant' else v:g}")
        rows.append(tuple(row))
    return names, np.asarray(rows, np.float64)


def net_keep(usage) -> float:
    """Mean of the token keep, MLP-input keep and bit ratio (realized, over effective steps)."""
    return float(np.mean(usage))


class _Results:
    """Per-method per-block results, accumulated over batches."""

    def __init__(self):
        self.nll: dict[str, list] = {}
        self.usage: dict[str, list] = {}

    def add(self, name: str, nll_b, usage_b3) -> None:
        self.nll.setdefault(name, []).append(np.asarray(nll_b, np.float64))
        self.usage.setdefault(name, []).append(np.asarray(usage_b3, np.float64))

    def get(self, name: str, n: int):
        return np.concatenate(self.nll[name])[:n], np.concatenate(self.usage[name])[:n]


def _point(method: str, nll: np.ndarray, usage: np.ndarray, T: int, target, sweep: int | None) -> dict:
    """One result: ``nll [N]`` per-block summed NLL, ``usage [N, 3]`` per-block realized usage."""
    per_tok = nll / T
    mean = float(per_tok.mean())
    se = float(per_tok.std(ddof=1) / math.sqrt(len(per_tok))) if len(per_tok) > 1 else 0.0
    u = usage.mean(0)
    point = {
        "method": method,
        "target": None if target is None else dict(zip(AXES, map(float, target))),
        "usage": dict(zip(AXES, map(float, u))),
        "net_keep": net_keep(u),
        "ppl": math.exp(mean),
        "ppl_ci": [math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)],
        "nll": mean,
        "blocks": int(len(nll)),
        "sweep": sweep,
        "block_nll": [round(float(v), 5) for v in per_tok],
    }
    if target is not None:
        point["adherence"] = dict(zip(AXES, map(float, np.abs(usage - np.asarray(target)).mean(0))))
    return point


class Sweep:
    """Runs a :class:`SweepConfig` for one policy on the LM (see the module doc)."""

    def __init__(self, lm: tuple, train_cfg, policy_vars: dict, scfg: SweepConfig):

        self.lm_cfg, self.params, self.tokenizer = lm
        check_episode_length(train_cfg, self.lm_cfg)
        self.cfg = train_cfg
        self.policy_vars = parallel.replicate_on(policy_vars, self.params)  # beside the LM, on its mesh
        self.sc = scfg
        self.grid = action_grid(train_cfg)
        self.sparsity = sparsity_config(train_cfg)
        self.policy = PolicyController(grid=self.grid, policy=policy_config(train_cfg), greedy=True,
                                       guard=scfg.guard)
        self.targets = scfg.targets or default_targets(self.grid)
        self.policy.check_targets(np.asarray(self.targets))  # a guard cannot cap below the grid
        self.static = scfg.static if scfg.static else default_static(self.grid)
        self.M, self.T = train_cfg.context_len, train_cfg.rollout_len

    def _run(self, blocks, pre, controller, ctrl_params, targets_b3, K: int, seed: int = 0):
        traj = rollout(self.lm_cfg, self.sparsity, self.params, blocks, jnp.asarray(targets_b3, jnp.float32),
                       controller, ctrl_params, jax.random.PRNGKey(seed), context_len=self.M, schedules=K,
                       prefilled=pre, feed_effective=True)  # the applied action, as at run time
        nll = -np.asarray(traj.logp_true, np.float64).sum(-1)  # [B, K]
        usage = np.asarray(episode_usage(traj.usage, traj.effective), np.float64)  # [B, K, 3]
        return nll, usage, np.asarray(traj.actions)

    def _batches(self, blocks: np.ndarray):
        B = min(self.sc.batch_size, len(blocks))
        for i in range(0, len(blocks), B):
            chunk = blocks[i:i + B]
            if len(chunk) < B:  # pad the last batch with its first block (results are dropped)
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], B - len(chunk), 0)])
            chunk = jnp.asarray(chunk, jnp.int32)
            yield i // B, chunk, prefill_blocks(self.lm_cfg, self.sparsity, self.params, chunk, self.M)

    def run(self, blocks: np.ndarray, progress: bool = True) -> dict:
        """Evaluates every method on ``blocks [N, M + T + 1]``; returns ``{"points": [...], ...}``."""
        from tqdm import tqdm

        blocks = np.asarray(blocks)
        N, T, methods = len(blocks), self.T, set(self.sc.methods)
        if blocks.ndim != 2 or blocks.shape[1] != self.M + T + 1:
            raise SoljaxError(f"evaluation blocks must be [N, {self.M + T + 1}], got {list(blocks.shape)}")
        nb = math.ceil(N / min(self.sc.batch_size, N))
        P = len(self.targets)
        baselines = methods & {"fixed", "random", "emc", "dac"}
        scored = "policy" in methods or bool(baselines)
        total = nb * P * (("policy" in methods) + scored) + nb * bool(methods & {"dense", "static"})
        bar = tqdm(total=total, desc="eval", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        res, passage = _Results(), {}
        pol_targets = [np.asarray(t, np.float64) for t in self.targets]
        pol_actions, pol_usage = {}, {p: [] for p in range(P)}
        for bi, chunk, pre in self._batches(blocks) if "policy" in methods else ():  # pass 1: the policy acts
            B = chunk.shape[0]
            for p, tgt in enumerate(pol_targets):
                _, usage, actions = self._run(chunk, pre, self.policy, self.policy_vars,
                                              np.broadcast_to(tgt, (B, 3)), 1)
                pol_actions[bi, p] = actions
                pol_usage[p].append(usage[:, 0])
                if bi == 0:
                    passage[p] = actions[:, 0]
                bar.update(1)
        # baselines spend what the policy spent (or the targets themselves without a policy)
        matched = {p: np.concatenate(pol_usage[p])[:N].mean(0) if "policy" in methods else pol_targets[p]
                   for p in range(P)}
        names, static = static_controls(self.static, self.grid.rho_max)
        R = self.sc.random_trials
        for bi, chunk, pre in self._batches(blocks):  # pass 2: baselines act, then every method is scored
            B = chunk.shape[0]
            if methods & {"dense", "static"}:
                ctrl = Controls(*(jnp.broadcast_to(jnp.asarray(static[:, j], dt)[None, :, None], (B, len(names), T))
                                  for j, dt in enumerate((jnp.float32, jnp.float32, jnp.int32))))
                nll, usage, _ = self._run(chunk, pre, GivenControls(rho_max=self.grid.rho_max), ctrl,
                                          np.ones((B, 3)), len(names))
                for k, name in enumerate(names):
                    res.add(name, nll[:, k], usage[:, k])
                bar.update(1)
            if not scored:
                continue
            for p in range(P):
                tgt = np.broadcast_to(matched[p], (B, 3))
                rows, row_names = [], []
                if "policy" in methods:
                    rows.append(pol_actions[bi, p])
                    row_names.append(f"policy/{p}")
                if methods & {"fixed", "random"}:
                    rng = np.random.default_rng([self.sc.seed, p, bi])
                    phase = block_phases(bi * B + np.arange(B))  # matches the average over all blocks
                    rows.append(fixed_schedule(self.grid, tgt, T, 1, phase))
                    row_names.append(f"fixed/{p}")
                    if "random" in methods:
                        rows.append(random_schedule(self.grid, tgt, T, R, rng, phase))
                        row_names += [f"random/{p}/{k}" for k in range(R)]
                for name, ctrl in (("emc", EntropyMarginController(grid=self.grid, gamma=self.sc.gamma)),
                                   ("dac", DriftController(grid=self.grid, gamma=self.sc.gamma,
                                                           hidden_size=self.lm_cfg.hidden_size))):
                    if name in methods:
                        rows.append(self._run(chunk, pre, ctrl, (), tgt, 1)[2])
                        row_names.append(f"{name}/{p}")
                # one compiled program scores every method's schedule: pruning and low-bit quantization
                # amplify the last-bit differences between programs of other shapes into visible
                # per-block noise, which must not enter the paired comparisons
                acts = np.concatenate(rows, axis=1)
                nll, usage, _ = self._run(chunk, pre, GivenActions(self.grid), jnp.asarray(acts), tgt, acts.shape[1])
                for k, name in enumerate(row_names):
                    res.add(name, nll[:, k], usage[:, k])
                bar.update(1)
        bar.close()
        return self._collect(res, N, matched, passage, names, blocks)

    def _collect(self, res: _Results, N: int, matched: dict, passage: dict, static_names, blocks) -> dict:
        T, points, methods = self.T, [], set(self.sc.methods)
        for p, tgt in enumerate(self.targets):
            if "policy" in methods:
                points.append(_point("policy", *res.get(f"policy/{p}", N), T, tgt, p))
            for name in ("fixed", "emc", "dac"):
                if name in methods:
                    points.append(_point(name, *res.get(f"{name}/{p}", N), T, matched[p], p))
            if "random" in methods:
                trials = [res.get(f"random/{p}/{k}", N) for k in range(self.sc.random_trials)]
                best = min(trials, key=lambda tr: tr[0].sum())
                points.append(_point(f"random_best_of_{len(trials)}", *best, T, matched[p], p))
                mean = _point("random_mean", np.mean([tr[0] for tr in trials], 0),
                              np.mean([tr[1] for tr in trials], 0), T, matched[p], p)
                mean["ppl_trials"] = sorted(math.exp(tr[0].sum() / (N * T)) for tr in trials)
                points.append(mean)
        for name in static_names:
            kind = name.split("@")[0]
            if (kind == "dense" and "dense" in methods) or (kind != "dense" and "static" in methods):
                points.append(_point(name, *res.get(name, N), T, None, None))
        return {
            "points": points,
            "request": json.loads(json.dumps(dataclasses.asdict(self.sc))),
            "config": {**dataclasses.asdict(self.sc), "targets": [list(t) for t in self.targets],
                       "static": list(self.static), "context_len": self.M, "rollout_len": T,
                       "grid": {"keep_fracs": list(self.grid.keep_fracs),
                                "struct_prune_choices": list(self.grid.struct_prune_choices),
                                "quant_choices": list(self.grid.quant_choices)}},
            "passages": self._passages(passage, blocks),
        }

    def _passages(self, passage: dict, blocks: np.ndarray) -> list[dict]:
        """The policy's per-token actions on the first evaluation blocks, for the report."""
        out = []
        levels = axis_levels(self.grid)
        P, Q = len(levels[1]), len(levels[2])
        for p, acts in passage.items():
            acts = np.asarray(acts)[:4]  # the first batch's blocks: at most 4, fewer in a smaller batch
            n = len(acts)
            idx = [acts // (P * Q), (acts // Q) % P, acts % Q]
            usage = np.stack([lv[i] for lv, i in zip(levels, idx)], -1)  # [n, T, 3]
            out.append({"target": dict(zip(AXES, map(float, self.targets[p]))),
                        "blocks": [{"context_tail": self._text(blocks[b, max(0, self.M - 24):self.M]),
                                    "tokens": [self._text([t]) for t in blocks[b, self.M:self.M + self.T]],
                                    "usage": np.round(usage[b], 4).tolist()} for b in range(n)]})
        return out

    def _text(self, ids) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])


def write_sweep(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Writes ``sweep.json`` and ``sweep.csv`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    cols = ["method", "sweep", "target_token", "target_prune", "target_quant", "token", "prune", "quant",
            "net_keep", "ppl", "ppl_lo", "ppl_hi", "blocks"]
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for pt in result["points"]:
            tgt = pt["target"] or {}
            w.writerow([pt["method"], pt["sweep"], *(tgt.get(a, "") for a in AXES),
                        *(round(pt["usage"][a], 5) for a in AXES), round(pt["net_keep"], 5), round(pt["ppl"], 4),
                        round(pt["ppl_ci"][0], 4), round(pt["ppl_ci"][1], 4), pt["blocks"]])
    return {"json": out / "sweep.json", "csv": out / "sweep.csv"}


def split_blocks(shuffled: np.ndarray, scfg: SweepConfig) -> np.ndarray:
    """The ``scfg.num_blocks`` blocks of ``scfg.split`` from the data's blocks in shuffled order."""
    start = 0 if scfg.split == "valid" else VALID_BLOCKS
    blocks = shuffled[start:start + scfg.num_blocks]
    if len(blocks) < scfg.num_blocks:
        raise SoljaxError(f"{scfg.data!r} has {len(shuffled)} blocks: not enough for {scfg.num_blocks} "
                          f"{scfg.split} blocks after the {VALID_BLOCKS} validation blocks")
    return blocks


def eval_ppl(run_dir: str | Path, scfg: SweepConfig, out_dir: str | Path | None = None, *,
             lm: tuple | None = None, progress: bool = True) -> dict:
    """Loads the run's policy and LM, cuts evaluation blocks, runs the sweep and writes it."""
    from soljax.data.blocks import load_blocks
    from soljax.runs import checkpoint_steps, load_lm_sharded, load_policy

    train_cfg, policy_vars = load_policy(run_dir)
    if lm is None:
        lm = load_lm_sharded(train_cfg)
    check_episode_length(train_cfg, lm[0])  # before cutting blocks of that length
    blocks = split_blocks(load_blocks(scfg.data, lm[2], context_len=train_cfg.context_len,
                                      rollout_len=train_cfg.rollout_len, seed=scfg.seed), scfg)
    result = Sweep(lm, train_cfg, policy_vars, scfg).run(blocks, progress=progress)
    result["run_dir"] = str(run_dir)
    result["checkpoint"] = checkpoint_steps(run_dir)[-1]
    write_sweep(result, out_dir or Path(run_dir) / "eval")
    return result
