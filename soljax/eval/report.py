"""``soljax eval report``: a Markdown summary and figures from a perplexity sweep's ``sweep.json``.

Writes into the sweep's directory: ``report.md`` (policy vs every baseline per target, paired
differences, budget adherence, static points, Pareto fronts), ``pareto.png`` (perplexity vs net
keep), ``adherence.png`` (realized vs target per axis) and ``actions.png`` (which tokens the policy
gave compute to).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from soljax.compress.actions import AXES
from soljax.errors import SoljaxError
from soljax.plots import pareto_front


def _paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error of the per-block NLL difference a - b (nats per token)."""
    d = np.asarray(a["block_nll"]) - np.asarray(b["block_nll"])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def _fmt_target(t: dict) -> str:
    return "/".join(f"{t[a]:.2f}" for a in AXES)


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.json"
    if not path.is_file():
        raise SoljaxError(f"no sweep at {path} (run `soljax eval ppl` first)")
    try:
        result = json.loads(path.read_text())
        result["points"]
    except (ValueError, KeyError, TypeError):
        raise SoljaxError(f"{path} is not a soljax sweep (no 'points')") from None
    return result


def summarize(result: dict) -> dict:
    """Per target: the policy's point, every baseline's, and the paired difference to fixed."""
    points = result["points"]
    rows = []
    for s in sorted({p["sweep"] for p in points if p["sweep"] is not None}):
        by = {p["method"]: p for p in points if p["sweep"] == s}
        if "policy" not in by:
            continue
        row = {"sweep": s, "policy": by["policy"], "others": {m: p for m, p in by.items() if m != "policy"}}
        if "fixed" in by:
            row["vs_fixed"] = _paired(by["policy"], by["fixed"])
        best = next((m for m in by if m.startswith("random_best")), None)
        if best:
            row["vs_random_best"] = _paired(by["policy"], by[best])
        rows.append(row)
    return {"rows": rows,
            "static": [p for p in points if p["sweep"] is None]}


def markdown(result: dict) -> str:
    summary = summarize(result)
    cfg = result.get("config", {})
    rows = summary["rows"]
    methods = [m for m in ("fixed",) + tuple(sorted({m for r in rows for m in r["others"]
                                                        if m.startswith("random_best")}))
               + ("random_mean", "emc", "dac") if any(m in r["others"] for r in rows)]
    n_blocks = rows[0]["policy"]["blocks"] if rows else (summary["static"][0]["blocks"] if summary["static"] else 0)
    out = ["# SOL evaluation report", ""]
    out.append(f"Run: `{result.get('run_dir', '?')}`; data: `{cfg.get('data', '?')}` ({cfg.get('split', 'test')} "
               f"split), {n_blocks} blocks of "
               f"{cfg.get('context_len', '?')} context + {cfg.get('rollout_len', '?')} controlled tokens; grid "
               f"{cfg.get('grid', {})}.")
    out.append("Perplexity is over the controlled tokens; baselines are matched to the policy's realized "
               "average usage at each target; brackets are 95% intervals over blocks; the last columns are "
               "the paired per-block difference in nats per token (negative: the policy is better).")
    if any(m.startswith("random_best") for m in methods):
        out.append("Best-of-N random is an oracle: for each block, the best of N random schedules is chosen on the "
                   "evaluation tokens themselves, which no deployable method can do.")
    if cfg.get("guard"):
        out.append("The policy ran with the budget guard: each target was a hard cap on its episode's usage.")
    out += ["", "![perplexity vs net keep](pareto.png)", ""]
    if rows:
        head = ["target tok/pru/q", "net keep", "policy ppl"] + [
            f"{m} (oracle) ppl" if m.startswith("random_best") else f"{m} ppl" for m in methods] + [
            "policy - fixed", "policy - best random (oracle)"]
        out += ["## Policy vs baselines at matched budgets", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for r in rows:
            p = r["policy"]
            cells = [_fmt_target(p["target"]), f"{p['net_keep']:.3f}",
                     f"{p['ppl']:.2f} [{p['ppl_ci'][0]:.1f}, {p['ppl_ci'][1]:.1f}]"]
            cells += [f"{r['others'][m]['ppl']:.2f}" if m in r["others"] else "-" for m in methods]
            for key in ("vs_fixed", "vs_random_best"):
                cells.append(f"{r[key][0]:+.3f} ± {r[key][1]:.3f}" if key in r else "-")
            out.append("| " + " | ".join(cells) + " |")
        wins = [r for r in rows if "vs_fixed" in r and r["policy"]["ppl"] < r["others"]["fixed"]["ppl"]]
        best = [r for r in rows if "vs_random_best" in r and r["vs_random_best"][0] <= 0]
        out += ["", f"The policy's perplexity is below fixed at {len(wins)} of {len(rows)} targets and at or "
                    f"below the best random schedule at {len(best)} of {len(rows)}.", ""]
        out += ["## Budget adherence", "", "![realized vs target](adherence.png)", "",
                "Mean absolute gap between realized and target usage, per block, per axis:", "",
                "| target tok/pru/q | realized tok/pru/q | gap token | gap prune | gap quant |",
                "|---|---|---|---|---|"]
        for r in rows:
            p = r["policy"]
            out.append(f"| {_fmt_target(p['target'])} | {_fmt_target(p['usage'])} | "
                       + " | ".join(f"{p['adherence'][a]:.3f}" for a in AXES) + " |")
        mean_gap = {a: np.mean([r["policy"]["adherence"][a] for r in rows]) for a in AXES}
        out += ["", "Over all targets: " + ", ".join(f"{a} {v:.3f}" for a, v in mean_gap.items()) + ".", ""]
        out += ["## Pareto fronts", ""]
        for m in ["policy"] + methods:
            pts = [r["policy"] if m == "policy" else r["others"][m] for r in rows if m == "policy" or m in r["others"]]
            front = pareto_front(pts)
            out.append(f"- **{m}**: " + ", ".join(f"{p['ppl']:.2f} @ {p['net_keep']:.3f}" for p in front))
        out.append("")
    if summary["static"]:
        out += ["## Dense and static single-axis points", "", "| method | net keep | ppl |", "|---|---|---|"]
        for p in summary["static"]:
            out.append(f"| {p['method']} | {p['net_keep']:.3f} | {p['ppl']:.2f} "
                       f"[{p['ppl_ci'][0]:.1f}, {p['ppl_ci'][1]:.1f}] |")
        out.append("")
    if result.get("passages"):
        out += ["## Which tokens got compute", "", "![policy actions per token](actions.png)", ""]
    return "\n".join(out)


def write_report(sweep: str | Path) -> dict[str, Path]:
    """Writes the report and figures next to ``sweep`` (a sweep directory or its ``sweep.json``)."""
    from soljax.plots import plot_adherence, plot_pareto, plot_passage

    sweep = Path(sweep)
    out_dir = sweep if sweep.is_dir() else sweep.parent
    result = load_sweep(sweep)
    paths = {"report": out_dir / "report.md"}
    paths["pareto"] = plot_pareto(result["points"], out_dir / "pareto.png")
    if any(p["method"] == "policy" for p in result["points"]):
        paths["adherence"] = plot_adherence(result["points"], out_dir / "adherence.png")
    if result.get("passages"):
        mid = sorted(result["passages"], key=lambda q: abs(np.mean(list(q["target"].values())) - 0.65))[0]
        paths["actions"] = plot_passage(mid, out_dir / "actions.png")
    paths["report"].write_text(markdown(result))
    return paths
