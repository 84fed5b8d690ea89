"""The report of a paper-protocol evaluation (:mod:`soljax.eval.protocol`): ``report.md`` and
``pareto.png`` in its directory.

The report says which data was read (and that it is not WikiText-2 when it is not), the protocol's
settings and every departure from the paper's, then the policy's Pareto front over the target grid
against the fixed allocation and the best of N random schedules at matched realized usage, with
paired per-block differences, both methods' fronts over the whole scan, and the dense and static
single-axis points.
"""

from __future__ import annotations

import json
from pathlib import Path

from soljax.compress.actions import AXES
from soljax.errors import SoljaxError
from soljax.eval.report import load_sweep, summarize
from soljax.plots import pareto_front, plot_pareto


def load_paper(out_dir: str | Path) -> dict:
    """``{"protocol", "scan", "front"}`` of a paper-protocol directory."""
    out = Path(out_dir)
    path = out / "protocol.json"
    if not path.is_file():
        raise SoljaxError(f"no paper-protocol evaluation at {out} (no protocol.json; run `soljax eval ppl "
                          f"--protocol paper` first)")
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise SoljaxError(f"{path} is not valid JSON") from None
    return {"protocol": record, "scan": load_sweep(out / "scan"), "front": load_sweep(out / "front")}


def _triple(d: dict) -> str:
    return "/".join(f"{d[a]:.2f}" for a in AXES)


def _data_lines(rec: dict) -> list[str]:
    d = rec["data"]
    head = (f"**Data: {d['description']}**." if d["wikitext2"] else
            f"**Data: {d['description']}. This is not WikiText-2 validation: the perplexities are not "
            f"comparable with the paper's.**")
    return [head, "",
            f"The first {d['rows_cap']} rows were read ({d['rows_read']} rows, {d['rows_nonempty']} non-empty; empty "
            f"and whitespace-only rows skipped), tokenized without special tokens and concatenated without "
            f"separators: {d['tokens']} tokens, {d['blocks_available']} blocks of M + T + 1 = {rec['block_len']}. "
            f"Evaluated: the first {d['batches']} batch(es) of {d['batch_size']} blocks ({d['blocks']} blocks), "
            f"unshuffled."]


def _settings_lines(rec: dict) -> list[str]:
    g = rec["grid"]
    levels = "; ".join(f"{a}: {', '.join(f'{v:g}' for v in lv)}" for a, lv in g["levels"].items())
    out = ["## Protocol", "",
           "| setting | this evaluation | the paper |", "|---|---|---|",
           f"| dense prefix M | {rec['prefix']} (run's training M: {rec['train_context_len']}) | the run's training M "
           f"(1,024 for 1B, 512 for 3B/8B) |",
           f"| controlled tokens T | {rec['rollout_len']} | the run's rollout length |",
           f"| LM dtype | {rec['dtype']} | bfloat16 |",
           f"| blocks | {rec['data']['batches']} x {rec['data']['batch_size']} | 7 x 16, unshuffled |",
           f"| target grid | {g['scanned']} of {g['size']} targets | every combination of the per-axis levels |",
           f"| random schedules | best of {rec['front']['trials']} at {len(rec['front']['scan_sweeps'])} front "
           f"targets | best of 30 (or 500) at a subsample of 8 (or 4) front targets |",
           "",
           f"Target levels (quant as bits / 16): {levels}. Rule: {g['rule']}."]
    deps = rec.get("departures") or []
    out += ["", "Departures from the paper's protocol: " + ("; ".join(deps) + "." if deps else "none.")]
    return out


def paper_markdown(result: dict) -> str:
    rec, scan, front = result["protocol"], result["scan"], result["front"]
    rows = summarize(front)["rows"]
    best = next((m for r in rows for m in r["others"] if m.startswith("random_best")), None)
    n_trials = rec["front"]["trials"]
    out = ["# SOL evaluation: the paper's perplexity protocol", ""]
    out.append(f"Run: `{rec.get('run_dir', '?')}` (checkpoint {rec.get('checkpoint', '?')}).")
    out += [""] + _data_lines(rec) + [""] + _settings_lines(rec) + [""]
    out += ["![perplexity vs net keep](pareto.png)", ""]
    out += ["## The policy's Pareto front against fixed and random allocation", "",
            "At each of the policy's Pareto-optimal targets (perplexity vs realized net keep over the scan) the "
            "greedy policy runs again, the fixed allocation and N random two-level schedules are matched to its "
            "realized per-axis usage (so to its net keep), and all are scored in one call on the same blocks. "
            f"Best-of-{n_trials} random is an oracle: the trial with the lowest perplexity is chosen on the "
            "evaluation tokens themselves, which no deployable method can do. Perplexity is over the T controlled "
            "tokens of each block; brackets are 95% intervals over blocks; the differences are paired per block, "
            "in nats per token (negative: the policy is better).", ""]
    head = ["target tok/pru/q", "realized tok/pru/q", "net keep", "policy ppl", "fixed ppl",
            f"best of {n_trials} random (oracle)", "random mean", "policy - fixed", "policy - best random"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p, o = r["policy"], r["others"]
        cell = lambda m: f"{o[m]['ppl']:.2f}" if m in o else "-"  # noqa: E731
        diff = lambda k: f"{r[k][0]:+.3f} ± {r[k][1]:.3f}" if k in r else "-"  # noqa: E731
        out.append("| " + " | ".join([_triple(p["target"]), _triple(p["usage"]), f"{p['net_keep']:.3f}",
                                      f"{p['ppl']:.2f} [{p['ppl_ci'][0]:.1f}, {p['ppl_ci'][1]:.1f}]", cell("fixed"),
                                      cell(best) if best else "-", cell("random_mean"), diff("vs_fixed"),
                                      diff("vs_random_best")]) + " |")
    wins = sum(r["policy"]["ppl"] < r["others"]["fixed"]["ppl"] for r in rows if "fixed" in r["others"])
    oracle = sum(r["vs_random_best"][0] <= 0 for r in rows if "vs_random_best" in r)
    out += ["", f"At the front's {len(rows)} targets the policy's perplexity is below fixed at {wins} and at or "
                f"below the best random schedule at {oracle}.", ""]
    out += ["## Fronts over the whole scan", "",
            f"Lower envelopes (perplexity @ realized net keep) over all {rec['grid']['scanned']} scanned targets; "
            "each fixed point is matched to the policy's realized usage at the same target. The scan and the rerun "
            "are different compiled programs (another number of schedules per block); under low-bit quantization "
            "and pruning their last-bit differences move single blocks by up to tenths of a nat, so compare "
            "methods within the front table above (one call, paired), not across the two sections.", ""]
    for m in ("policy", "fixed"):
        pts = pareto_front([p for p in scan["points"] if p["method"] == m])
        out.append(f"- **{m}**: " + ", ".join(f"{p['ppl']:.2f} @ {p['net_keep']:.3f}" for p in pts))
    static = [p for p in scan["points"] if p["sweep"] is None]
    if static:
        out += ["", "## Dense and static single-axis points", "",
                "quest@x: token keep x only; teal@x: MLP-input keep x only; zeroquant@b: b-bit MLP output only.", "",
                "| method | net keep | ppl |", "|---|---|---|"]
        out += [f"| {p['method']} | {p['net_keep']:.3f} | {p['ppl']:.2f} [{p['ppl_ci'][0]:.1f}, "
                f"{p['ppl_ci'][1]:.1f}] |" for p in static]
    out += ["", "Files: `protocol.json` (settings, data, grid), `scan/sweep.json` and `scan/sweep.csv` (every target: "
                "policy, fixed; dense and static), `front/sweep.json` and `front/sweep.csv` (the front targets with "
                "the random schedules).", ""]
    return "\n".join(out)


def write_paper_report(out_dir: str | Path) -> dict[str, Path]:
    """Writes ``report.md`` and ``pareto.png`` into a paper-protocol directory."""
    out = Path(out_dir)
    result = load_paper(out)
    random = [p for p in result["front"]["points"] if p["method"].startswith("random")]
    d = result["protocol"]["data"]
    title = (f"{'WikiText-2 validation' if d['wikitext2'] else 'not WikiText-2: ' + Path(d['source']).name}, "
             f"M={result['protocol']['prefix']}, T={result['protocol']['rollout_len']}, {d['blocks']} blocks")
    paths = {"report": out / "report.md",
             "pareto": plot_pareto(result["scan"]["points"] + random, out / "pareto.png", title=title,
                                   errorbars=False)}
    paths["report"].write_text(paper_markdown(result))
    return paths
