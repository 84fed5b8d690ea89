"""``soljax bench decode`` on a tiny model: the JSON schema, the speedup arithmetic, the plot."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_lm, write_policy_run
from soljax import cli
from soljax.config import TrainConfig
from soljax.control.network import PolicyConfig, init_policy
from soljax.errors import SoljaxError
from soljax.lm.checkpoint import save_model
from soljax.lm.tokenizer import Tokenizer
from soljax.control.given import constant_controls
from soljax.tools.bench_decode import format_table
from soljax.tools.shapes import shape_config

CFG, PARAMS = tiny_lm(0, scale=0.5, max_position_embeddings=128)
ROW_KEYS = {"context", "method", "target", "usage", "net_keep", "ms_per_token", "speedup", "nll", "calls"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, word_tokenizer_json):
    root = tmp_path_factory.mktemp("bench_decode")
    save_model(root / "model", CFG, PARAMS, Tokenizer(word_tokenizer_json(CFG.vocab_size)))
    tcfg = TrainConfig.load(None, [f"model={root / 'model'}", "rollout_len=4", "policy_d_model=32",
                                   "policy_n_heads=2", "policy_max_len=8", "quest_page_size=4", "Ts=1", "Tw=1",
                                   "keep_fracs=[0.1,1.0]", "struct_prune_choices=[s60,s100]",
                                   "quant_choices=[q5,q16]"])
    pcfg = PolicyConfig(d_model=32, n_heads=2, max_len=8)
    write_policy_run(root / "run", tcfg, init_policy(pcfg, 8, CFG.hidden_size, CFG.hidden_size,
                                                     jax.random.PRNGKey(1)))
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text(" ".join(f"w{i}" for i in rng.integers(1, CFG.vocab_size, 400)))
    return root


def test_bench_decode_json_schema_and_speedups(run, capsys, tmp_path):
    argv = ["bench", "decode", "--run", str(run / "run"), "--data", str(run / "text.txt"), "--context", "40",
            "--tokens", "6", "--targets", "0.5,0.8,0.6;0.2,0.6,0.4", "--masked", "--no-replay", "--impl", "cpu",
            "--json", "--plot", str(tmp_path / "time.png")]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"device", "rows"} and isinstance(result["device"], str)
    rows = result["rows"]
    methods = {"dense", "dense-fast", "fixed", "policy", "fixed-masked", "policy-masked", "fixed-noreplay",
               "policy-noreplay"}
    assert {r["method"] for r in rows} == methods and {r["context"] for r in rows} == {40}
    assert len(rows) == 2 + 4 * 3
    for r in rows:
        assert set(r) == ROW_KEYS and r["calls"] == 2  # 6 tokens -> two calls of T = 4 after the warm-up
        dense = next(d for d in rows if d["context"] == r["context"] and d["method"] == "dense")
        assert r["speedup"] == pytest.approx(dense["ms_per_token"] / r["ms_per_token"])
        assert r["net_keep"] == pytest.approx(np.mean(list(r["usage"].values())))
        assert np.isfinite(r["nll"]) and r["nll"] > 0
    assert all(d["speedup"] == 1.0 and d["target"] is None and d["net_keep"] == 1.0
               for d in rows if d["method"] == "dense")
    # the dense controller on the C++ kernel's fast path decodes what the dense decoder does
    dense, dense_fast = (next(r for r in rows if r["method"] == m) for m in ("dense", "dense-fast"))
    assert dense_fast["net_keep"] == 1.0 and dense_fast["nll"] == pytest.approx(dense["nll"], abs=1e-4)
    # the fast and the masked path decode the same tokens under the same decisions
    for r in rows:
        if r["method"] in ("fixed", "policy"):
            m = next(x for x in rows if x["method"] == r["method"] + "-masked" and x["context"] == r["context"]
                     and x["target"] == r["target"])
            assert r["usage"] == pytest.approx(m["usage"]) and r["nll"] == pytest.approx(m["nll"], abs=1e-4)
        if r["method"] == "fixed":  # without the replay, the same schedule over a cache of compressed entries
            m = next(x for x in rows if x["method"] == "fixed-noreplay" and x["target"] == r["target"])
            assert r["usage"] == pytest.approx(m["usage"]) and np.isfinite(m["nll"])
    fixed = [r for r in rows if r["method"] == "fixed"]
    assert any(r["net_keep"] < 0.9 for r in fixed)  # the schedules really compress
    assert (tmp_path / "time.png").stat().st_size > 0
    assert "speedup" in format_table(result)


def test_bench_decode_bad_input(run, capsys):
    base = ["bench", "decode", "--data", str(run / "text.txt"), "--tokens", "6"]
    assert cli.main(base) != 0 and "--run" in capsys.readouterr().err
    assert cli.main(base + ["--run", str(run / "run"), "--context", "120"]) != 0
    assert "positions" in capsys.readouterr().err
    with pytest.raises(SoljaxError, match="method"):
        from soljax.tools.bench_decode import run_bench_decode

        run_bench_decode(run / "run", methods=("oracle",))


def test_bench_decode_of_a_named_shape_with_random_weights(capsys):
    """``--shape``: the dense decoder against constant controls on both fast paths (the kernels
    interpreted), on the same random tokens."""
    argv = ["bench", "decode", "--shape", "llama-tiny", "--context", "64", "--tokens", "16", "--impl", "xla",
            "pallas", "--targets", "1,1,16;0.1,0.5,16", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["shape"], result["dtype"]) == ("llama-tiny", "float32")
    rows = {(r["method"], tuple(r["target"] or ())): r for r in result["rows"]}
    assert set(rows) == {("dense", ())} | {(m, t) for m in ("fast-xla", "fast-pallas") for t in ((1, 1, 1), (0.1, 0.5, 1))}
    dense = rows[("dense", ())]
    for (method, target), r in rows.items():
        assert r["calls"] == 1 and r["speedup"] == pytest.approx(dense["ms_per_token"] / r["ms_per_token"])
        if target:  # the constant controls are what the steps applied
            assert [r["usage"][a] for a in ("token", "prune", "quant")] == pytest.approx(target)
    for method in ("fast-xla", "fast-pallas"):  # dense controls decode what the dense decoder does
        assert rows[(method, (1, 1, 1))]["nll"] == pytest.approx(dense["nll"], abs=1e-4)
    sparse = rows[("fast-xla", (0.1, 0.5, 1))]
    assert sparse["nll"] != pytest.approx(dense["nll"], abs=1e-3)  # the sparse controls changed the model
    assert rows[("fast-pallas", (0.1, 0.5, 1))]["nll"] == pytest.approx(sparse["nll"], abs=1e-4)
    controls = constant_controls(3)(np.array([[0.1, 0.5, 0.25]]))  # targets read as keep, keep, bits / 16
    assert controls.kappa.shape == (1, 1, 3) and controls.bits.tolist() == [[[4, 4, 4]]]


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "llama-tiny", "--run", "somewhere"], "either --run"),
    (["--shape", "llama-tiny", "--plot", "x.png"], "random weights"),
])
def test_bench_decode_shape_bad_input(argv, needle, capsys):
    assert cli.main(["bench", "decode", *argv]) != 0
    assert needle in capsys.readouterr().err
    with pytest.raises(SoljaxError, match="unknown model shape"):
        shape_config("llama-70b")
