"""``soljax bench kernels``: the rows' schema, and the C++ kernels' rows beside XLA's."""

from __future__ import annotations

import json

import pytest

from soljax import cli


def test_bench_kernels_rows_per_impl(capsys):
    argv = ["bench", "kernels", "--context", "256", "--batch", "1", "--impl", "xla", "cpu", "--repeats", "1", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "float32"
    rows = {(r["op"], r["impl"], r["keep"]) for r in result["rows"]}
    attention = {("attention", i, k) for i in ("xla", "cpu") for k in (1.0, 0.1, 0.2, 0.5)}
    swiglu = {("swiglu", "xla", 1.0)} | {("swiglu", "cpu", k) for k in (1.0, 0.5, 0.8)}  # the C++ MLP: the whole op
    assert rows == attention | {("mlp", "xla", k) for k in (1.0, 0.5, 0.8)} | swiglu
    for r in result["rows"]:
        assert r["seconds"] > 0 and r["bytes"] > 0 and r["ideal_speedup"] >= 1.0
        if r["keep"] < 1:
            assert r["ideal_speedup"] > 1.0 and r["speedup"] == pytest.approx(
                next(d["seconds"] for d in result["rows"] if (d["op"], d["impl"], d["keep"]) == (r["op"], r["impl"], 1.0))
                / r["seconds"])
