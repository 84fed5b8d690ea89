"""Every notebook in notebooks/ executes top to bottom (outputs are stripped in git).

Notebooks run on the embedded model unless listed in ``NEEDS_TORCH``: those build a tiny
``transformers`` model instead and skip without torch. Each must finish well within a minute on two
CPU cores.
"""

from pathlib import Path

import pytest

from conftest import require, require_torch

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NEEDS_TORCH = {"03_convert_hf.ipynb"}


def _execute(path: Path):
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    nb = nbformat.read(path, as_version=4)
    # The kernel runs the embedded model: XLA's default optimization (not the suite's compile-fast
    # setting, see conftest), and 64 sampled schedules in 02 (512 by default; the same code runs).
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("XLA_FLAGS", raising=False)
        mp.setenv("SOLJAX_NB_SCHEDULES", "64")
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue") if errors else None
    return nb


def test_notebooks_are_stored_without_outputs():
    nbformat = require("nbformat")
    assert {"01_quickstart.ipynb", "02_schedule_sampling.ipynb", "03_convert_hf.ipynb"} <= {p.name for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name


@pytest.mark.embedded
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in NEEDS_TORCH],
                         ids=[p.name for p in NOTEBOOKS if p.name not in NEEDS_TORCH])
def test_notebook_executes(path, embedded_model):
    _execute(path)


@pytest.mark.torch
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name in NEEDS_TORCH],
                         ids=[p.name for p in NOTEBOOKS if p.name in NEEDS_TORCH])
def test_torch_notebook_executes(path):
    require_torch()
    nb = _execute(path)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "greedy continuations match" in printed
