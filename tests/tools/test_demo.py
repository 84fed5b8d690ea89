"""The main job end to end on the embedded model (a quick version), and its reuse on a rerun."""

import json

from soljax.cli import main


def test_quick_demo_runs_end_to_end_and_a_rerun_reuses_everything(embedded_model, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--quiet", "--out", str(out), "max_batches=1", "checkpoint_every=1"]
    assert main(args) == 0
    text = capsys.readouterr()
    assert "SOL policy vs budget-matched baselines" in text.out and "[policy]" in text.out
    for name in ("checkpoints", "metrics.jsonl", "training.png", "eval/sweep.json", "eval/report.md",
                 "eval/pareto.png", "eval/adherence.png", "eval/actions.png", "sample.json"):
        assert (out / name).exists(), name
    sweep = json.loads((out / "eval" / "sweep.json").read_text())
    assert {p["method"] for p in sweep["points"]} == {"policy", "fixed", "random_best_of_2", "random_mean", "dense"}
    sample = json.loads((out / "sample.json").read_text())["samples"][0]
    assert sample["controlled"]["tokens"] > 0 and "dense" in sample
    mtime = (out / "eval" / "sweep.json").stat().st_mtime
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().err
    assert (out / "eval" / "sweep.json").stat().st_mtime == mtime
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
