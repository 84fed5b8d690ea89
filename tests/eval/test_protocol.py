"""``soljax eval ppl --protocol paper``: the reference's target grid, the front rerun, the report,
and bad input, on a tiny random model and a local text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tokenizer_json, tiny_lm, write_policy_run
from soljax.cli import main
from soljax.config import TrainConfig, action_grid, policy_config
from soljax.control.network import init_policy
from soljax.data.rows import eval_batches, read_rows, tokenize_rows
from soljax.errors import SoljaxError
from soljax.eval.protocol import PAPER_LEVELS, PaperConfig, paper_grid, paper_levels, spread
from soljax.lm import model as lm
from soljax.lm.checkpoint import save_model
from soljax.lm.tokenizer import Tokenizer
from soljax.plots import pareto_front

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
M, T, MAX_POS = 16, 8, 64
LEVELS_16 = tuple(b / 16 for b in range(5, 14))


def test_the_grid_is_every_combination_of_the_reference_levels_the_run_allows():
    demo = TrainConfig.load(CONFIGS / "demo.yaml")  # grid {0.1,1} x {0.6,1} x {5,16} bits, budgets within it
    levels = paper_levels(demo)
    assert levels == (PAPER_LEVELS[0], (0.6, 0.7, 0.8, 0.9, 1.0), LEVELS_16)
    grid = paper_grid(levels)
    assert len(grid) == 9 * 5 * 9 and len(set(grid)) == len(grid)
    assert grid[0] == (0.15, 0.6, 5 / 16) and grid[1] == (0.15, 0.6, 6 / 16) and grid[9] == (0.15, 0.7, 5 / 16)
    # the paper's full-level 1B config gets exactly the reference's 9 x 7 x 9 = 567 scan
    fl = paper_levels(TrainConfig.load(CONFIGS / "paper" / "sol_j_fl_t16.yaml"))
    assert fl == PAPER_LEVELS and len(paper_grid(fl)) == 567
    # single-axis configs: the fixed axes are held at their one level, the controlled one is restricted
    assert paper_levels(TrainConfig.load(CONFIGS / "paper" / "prune_s30.yaml")) == ((1.0,), PAPER_LEVELS[1], (1.0,))
    q = paper_levels(TrainConfig.load(CONFIGS / "paper" / "quant_q5q10.yaml"))
    assert q == ((1.0,), (1.0,), tuple(b / 16 for b in range(5, 11)))


def test_spread_picks_evenly_and_keeps_both_ends():
    values = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2]
    assert spread(values, None) == [1, 5, 3, 2, 4, 0]
    picked = spread(values, 3)
    assert [values[i] for i in picked] == [0.1, 0.3, 0.9]  # ranks 0, 2 (2.5 rounded to even), 5
    assert spread(values, 10) == spread(values, None)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A tiny model directory, a policy run on it, a local text and one paper-protocol evaluation."""
    root = tmp_path_factory.mktemp("paper")
    cfg, params = tiny_lm(max_position_embeddings=MAX_POS)
    tok = Tokenizer(make_tokenizer_json(cfg.vocab_size))
    save_model(root / "model", cfg, params, tok)
    tcfg = TrainConfig.load(None, [f"model={root / 'model'}", f"context_len={M}", f"rollout_len={T}",
                                   "policy_d_model=32", "policy_n_heads=2", "policy_max_len=8", "quest_page_size=4",
                                   "Ts=1", "Tw=1", "keep_fracs=[0.1,0.5,1.0]", "struct_prune_choices=[s60,s100]",
                                   "quant_choices=[q5,q8,q16]"])
    pol = init_policy(policy_config(tcfg), action_grid(tcfg).num_actions, 32, 32, jax.random.PRNGKey(1))
    write_policy_run(root / "run", tcfg, pol)
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(1, 97, rng.integers(0, 9))) for _ in range(300)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    out = root / "out"
    argv = ["eval", "ppl", "--run", root / "run", "--protocol", "paper", "--data", root / "text.txt", "--out", out,
            "--batches", 1, "--batch-size", 3, "--grid-points", 4, "--front-points", 2, "--trials", 2,
            "--dtype", "float32", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    return {"root": root, "out": out, "cfg": cfg, "params": params, "tok": tok, "tcfg": tcfg}


def test_the_protocol_writes_its_record_scan_front_and_report(paper_run):
    out = paper_run["out"]
    rec = json.loads((out / "protocol.json").read_text())
    scan = json.loads((out / "scan" / "sweep.json").read_text())
    front = json.loads((out / "front" / "sweep.json").read_text())
    assert rec["prefix"] == M and rec["rollout_len"] == T and rec["block_len"] == M + T + 1
    assert rec["data"]["blocks"] == 3 and rec["data"]["batches"] == 1 and not rec["data"]["wikitext2"]
    assert rec["grid"]["levels"]["prune"] == [0.6, 0.7, 0.8, 0.9, 1.0]  # the grid's and budget's 0.6 .. 1.0
    assert rec["grid"]["size"] == 9 * 5 * 9 and rec["grid"]["scanned"] == 4
    deps = " ".join(rec["departures"])
    for part in ("not WikiText-2", "1 batch(es) of 3 blocks", "float32", "4 of the", "2 random trials"):
        assert part in deps, part
    # the scan: policy and matched fixed at every scanned target, dense and the paper's static points once
    methods = [p["method"] for p in scan["points"]]
    assert methods.count("policy") == 4 and methods.count("fixed") == 4
    for m in ("dense", "quest@0.3", "quest@0.5", "teal@0.6", "teal@0.8", "zeroquant@5", "zeroquant@8"):
        assert m in methods, m
    # the rerun covers exactly the policy's Pareto-optimal scan targets (at most 2, both ends kept)
    pol = [p for p in scan["points"] if p["method"] == "policy"]
    front_pts = pareto_front(pol)
    want = [front_pts[i]["target"] for i in spread([p["net_keep"] for p in front_pts], 2)]
    got = [p["target"] for p in front["points"] if p["method"] == "policy"]
    assert sorted(map(str, got)) == sorted(map(str, want))
    for s in {p["sweep"] for p in front["points"]}:
        by = {p["method"]: p for p in front["points"] if p["sweep"] == s}
        assert set(by) == {"policy", "fixed", "random_best_of_2", "random_mean"}
        assert by["random_best_of_2"]["ppl"] == pytest.approx(min(by["random_mean"]["ppl_trials"]))
        assert by["fixed"]["target"] == pytest.approx(by["policy"]["usage"])
    report = (out / "report.md").read_text()
    assert "This is not WikiText-2 validation" in report and "text.txt" in report
    assert "| dense prefix M | 16 (run's training M: 16)" in report and "Departures from the paper's protocol" in report
    assert report.count("| " + "/".join(f"{got[0][a]:.2f}" for a in ("token", "prune", "quant")) + " |") == 1
    assert "oracle" in report and "- **policy**:" in report and "- **fixed**:" in report
    assert (out / "pareto.png").stat().st_size > 1000
    (out / "report.md").unlink()
    assert main(["eval", "report", str(out)]) == 0 and (out / "report.md").read_text() == report


def test_the_scan_reads_the_first_blocks_of_the_text_in_order(paper_run):
    """The dense point is the plain model's teacher-forced perplexity on the text's first 3 blocks."""
    r = paper_run
    ids = tokenize_rows(r["tok"], read_rows(r["root"] / "text.txt").rows)
    blocks = eval_batches(ids, M + T + 1, 3, 1)
    h = lm.forward(r["cfg"], r["params"], jnp.asarray(blocks[:, :-1]))
    logp = jax.nn.log_softmax(lm.logits(r["cfg"], r["params"], h), -1)
    lp = np.take_along_axis(np.asarray(logp), blocks[:, 1:, None], -1)[..., 0][:, M:]
    scan = json.loads((r["out"] / "scan" / "sweep.json").read_text())
    dense = next(p for p in scan["points"] if p["method"] == "dense")
    np.testing.assert_allclose(dense["block_nll"], -lp.mean(1), atol=2e-5)
    assert dense["ppl"] == pytest.approx(math.exp(-lp.mean()), rel=1e-4)


def _one_line_error(capsys, argv, *parts):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("soljax: error:"), err
    for part in parts:
        assert part in err, (part, err)


def test_bad_input_gives_one_line(paper_run, capsys, tmp_path):
    run, text = paper_run["root"] / "run", paper_run["root"] / "text.txt"
    base = ["eval", "ppl", "--run", run, "--protocol", "paper", "--out", tmp_path / "o", "--quiet"]
    _one_line_error(capsys, base + ["--data", text, "--prefix", 60], "M = 60", "exceeds the model's maximum context",
                    f"--prefix N with N <= {MAX_POS - T - 1}")
    _one_line_error(capsys, base, "WikiText-2 validation", "--data PATH")  # offline, no local copy
    _one_line_error(capsys, base + ["--data", text, "--targets", "0.5,0.8,8"], "--targets does not go with")
    _one_line_error(capsys, base + ["--data", text, "--batch-size", 500], "fewer than one batch of 500")
    _one_line_error(capsys, base + ["--data", text, "--grid-points", 0], "grid points must be a positive integer")
    _one_line_error(capsys, ["eval", "ppl", "--run", run, "--grid-points", 3], "--grid-points needs --protocol paper")
    with pytest.raises(SoljaxError, match="dtype"):
        PaperConfig(dtype="float16")
    assert not (tmp_path / "o").exists()
