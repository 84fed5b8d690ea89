"""The README's result tables are the committed sweeps' numbers (``scripts/results_tables.py``)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_source_is_committed():
    tables = _tables()
    for name, (source, _) in tables.BLOCKS.items():
        path = ROOT / "docs" / "results" / source
        assert path.exists(), f"{name}: {path} is missing"
        if path.is_dir():
            assert (path / "sweep.json").is_file(), f"{name}: {path}/sweep.json is missing"


def test_readme_blocks_equal_the_sweeps():
    assert _tables().check() == []


def test_an_edited_table_is_caught(tmp_path):
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    first_row = tables.blocks()["demo_test"].splitlines()[2]
    assert first_row in readme
    cells = first_row.split(" | ")
    cells[1] = "999.9"
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace(first_row, " | ".join(cells), 1))
    assert tables.check(edited) == ["demo_test"]


@pytest.mark.parametrize("sweep", ["demo_test", "demo_test_guard"])
def test_the_readme_statements_on_the_demo_sweeps_hold(sweep):
    """The README: below fixed, EMC and DAC at every target, never above the best of 30 random;
    under the guard, realized usage never above a target."""
    tables = _tables()
    rows = tables._rows(tables._load(sweep))
    assert len(rows) == 6
    for r in rows:
        ppl, others = r["policy"]["ppl"], r["others"]
        assert all(ppl < others[m]["ppl"] for m in ("fixed", "emc", "dac")), r
        assert round(ppl, 1) <= round(others[tables._best(r)]["ppl"], 1), r
        if sweep.endswith("guard"):
            assert all(r["policy"]["usage"][a] <= r["policy"]["target"][a] + 1e-6 for a in tables.AXES), r
