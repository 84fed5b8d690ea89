"""The package's dependency rules: the import-linter contracts in pyproject.toml, and no import
cycle between any two modules (a stricter check than the contracts' per-package one)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def _module_graph():
    grimp = require("grimp")
    return grimp.build_graph("soljax")


def test_no_import_cycles_between_modules():
    graph = _module_graph()
    modules = sorted(graph.modules)
    index = {m: i for i, m in enumerate(modules)}
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    order, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(m):
        order[m] = low[m] = len(order)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n not in index:
                continue
            if n not in order:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], order[n])
        if low[m] == order[m]:
            comp = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in modules:
        if m not in order:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed (pip install 'soljax[dev]')")
    run = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
