"""The main job end to end on the embedded model (a quick version), and its reuse on a rerun.

``soljax demo`` runs as a user runs it: the installed command's module in a fresh interpreter,
with XLA's default optimization (not the suite's compile-fast setting, see conftest)."""

import json
import os
import subprocess
import sys


def _demo(args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "soljax.cli", *args], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quick_demo_runs_end_to_end_and_a_rerun_reuses_everything(embedded_model, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--quiet", "--out", str(out), "max_batches=1", "checkpoint_every=1"]
    text = _demo(args)
    assert "SOL policy vs budget-matched baselines" in text.stdout and "[policy]" in text.stdout
    for name in ("checkpoints", "metrics.jsonl", "training.png", "eval/sweep.json", "eval/report.md",
                 "eval/pareto.png", "eval/adherence.png", "eval/actions.png", "sample.json"):
        assert (out / name).exists(), name
    sweep = json.loads((out / "eval" / "sweep.json").read_text())
    assert {p["method"] for p in sweep["points"]} == {"policy", "fixed", "random_best_of_2", "random_mean", "dense"}
    sample = json.loads((out / "sample.json").read_text())["samples"][0]
    assert sample["controlled"]["tokens"] > 0 and "dense" in sample
    reused = ("eval/sweep.json", "sample.json")
    mtimes = [(out / name).stat().st_mtime for name in reused]
    rerun = _demo(args).stderr
    assert "evaluation: reusing" in rerun and "sample: reusing" in rerun
    assert [(out / name).stat().st_mtime for name in reused] == mtimes
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
