"""The README's evaluation tables, generated from the committed sweeps in docs/results/.

    python scripts/results_tables.py            # print every table block
    python scripts/results_tables.py --check    # exit 1 unless README.md holds exactly these blocks
    python scripts/results_tables.py --write    # put these blocks into README.md

Each block sits in README.md between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``;
``tests/eval/test_results.py`` runs the check, so the README's numbers are the sweeps' numbers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
AXES = ("token", "prune", "quant")
COLUMNS = (("fixed", "fixed"), ("random_best", "best-of-{n} random (oracle)"), ("random_mean", "random mean"),
           ("emc", "EMC"), ("dac", "DAC"))


def _load(name: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from soljax.eval.report import load_sweep

    return load_sweep(RESULTS / name)


def _rows(result: dict) -> list[dict]:
    from soljax.eval.report import summarize

    return sorted(summarize(result)["rows"], key=lambda r: r["policy"]["net_keep"])


def _best(r: dict) -> str:
    return next(m for m in r["others"] if m.startswith("random_best"))


def _cells(r: dict, methods: list[str]) -> list[str]:
    """Perplexities of the policy and ``methods``, the lowest in bold."""
    ppl = {"policy": r["policy"]["ppl"], **{m: r["others"][m]["ppl"] for m in methods}}
    low = min(round(v, 1) for v in ppl.values())
    return [f"**{v:.1f}**" if round(v, 1) == low else f"{v:.1f}" for v in ppl.values()]


def _diff(r: dict) -> str:
    mean, se = r["vs_fixed"]
    return "0" if mean == 0 and se == 0 else f"{mean:+.2f} ± {se:.2f}"


def _methods(r: dict, columns) -> list[str]:
    return [_best(r) if key == "random_best" else key for key, _ in columns]


def _head(rows, columns) -> list[str]:
    n = _best(rows[0]).rsplit("_", 1)[-1]
    return [title.format(n=n) for _, title in columns]


def table_unguarded(result: dict) -> str:
    rows = _rows(result)
    head = ["net keep", "policy", *_head(rows, COLUMNS), "policy - fixed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([f"{r['policy']['net_keep']:.3f}", *_cells(r, _methods(r, COLUMNS)),
                                      _diff(r)]) + " |")
    static = {p["method"]: p for p in result["points"] if p["sweep"] is None}
    gaps = np.array([[abs(r["policy"]["usage"][a] - r["policy"]["target"][a]) for a in AXES] for r in rows])
    parts = [f"{m} {p['ppl']:.1f} (net keep {p['net_keep']:.2f})" for m, p in static.items() if m != "dense"]
    out += ["", f"Dense: {static['dense']['ppl']:.1f}. Static single-axis points: {'; '.join(parts)}. "
                f"The policy's mean gap between realized usage and target: token {gaps[:, 0].mean():.2f}, "
                f"prune {gaps[:, 1].mean():.2f}, quant {gaps[:, 2].mean():.2f}."]
    return "\n".join(out)


def table_guarded(result: dict) -> str:
    rows = _rows(result)
    columns = [c for c in COLUMNS if c[0] != "random_mean"]
    head = ["target tok/pru/q", "realized", "policy", *_head(rows, columns), "policy - fixed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    over = 0.0
    for r in rows:
        p = r["policy"]
        over = max(over, *(p["usage"][a] - p["target"][a] for a in AXES))
        out.append("| " + " | ".join(["/".join(f"{p['target'][a]:.2f}" for a in AXES),
                                      "/".join(f"{p['usage'][a]:.2f}" for a in AXES),
                                      *_cells(r, _methods(r, columns)), _diff(r)]) + " |")
    gaps = np.array([[r["policy"]["target"][a] - r["policy"]["usage"][a] for a in AXES] for r in rows])
    out += ["", f"Mean gap below the targets: token {gaps[:, 0].mean():.2f}, prune {gaps[:, 1].mean():.2f}, "
                f"quant {gaps[:, 2].mean():.2f}; the largest excess of realized usage over a target: {max(over, 0):.3f}."]
    return "\n".join(out)


def training_summary(rows: list[dict]) -> str:
    """How the demo run's metrics moved: the mean of its first vs its last 30 batches."""
    first, last = rows[:30], rows[-30:]

    def mean(part, key):
        return float(np.mean([r[key] for r in part]))

    def moved(key, what):
        return f"{what} {mean(first, key):.2f} -> {mean(last, key):.2f}"

    return (f"Over its {len(rows)} batches (mean of the first vs the last 30): "
            + ", ".join([moved("penalty_mean", "budget penalty"), moved("penalized_return_mean", "penalized return"),
                         moved("reward_mean", "reward (minus the KL to the dense model)"),
                         *(moved(f"gap_{a}", f"{a} usage gap to the target") for a in AXES)]) + ".")


def _metrics(name: str) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from soljax.runs import read_metrics

    return read_metrics(RESULTS / name)


BLOCKS = {"demo_training": ("demo_metrics.jsonl", lambda name: training_summary(_metrics(name))),
          "demo_test": ("demo_test", lambda name: table_unguarded(_load(name))),
          "demo_test_guard": ("demo_test_guard", lambda name: table_guarded(_load(name)))}


def blocks() -> dict[str, str]:
    return {name: fn(source) for name, (source, fn) in BLOCKS.items()}


def _marked(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results:{name} -->\n)(.*?)(\n<!-- /results:{name} -->)", re.S)


def check(readme: Path = ROOT / "README.md") -> list[str]:
    """The names of the blocks whose text in the README differs from the sweeps'."""
    text = readme.read_text()
    bad = []
    for name, body in blocks().items():
        m = _marked(name).search(text)
        if m is None or m.group(2).strip() != body.strip():
            bad.append(name)
    return bad


def write(readme: Path = ROOT / "README.md") -> None:
    """Replace every marked block of the README with the sweeps' text (the markers must exist)."""
    text = readme.read_text()
    for name, body in blocks().items():
        text, n = _marked(name).subn(lambda m: m.group(1) + body.strip() + m.group(3), text)
        if n != 1:
            raise SystemExit(f"README.md: expected one <!-- results:{name} --> block, found {n}")
    readme.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with README.md instead of printing")
    ap.add_argument("--write", action="store_true", help="write the blocks into README.md")
    args = ap.parse_args()
    if args.write:
        write()
        return 0
    if args.check:
        bad = check()
        for name in bad:
            print(f"README.md: results block {name!r} differs from docs/results/{BLOCKS[name][0]}", file=sys.stderr)
        return 1 if bad else 0
    for name, body in blocks().items():
        print(f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
