"""Writes constraints.txt: the exact versions, in the running environment, of every package that
soljax's dependencies and the extras `make` installs pull in (the transitive closure, markers
evaluated for this Python and platform). Run with the environment CI uses:

    .venv/bin/python scripts/freeze_constraints.py > constraints.txt
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("data", "dev", "eval", "torch")  # what `make test` installs; `make demo` installs a subset


def closure(roots: list[Requirement]) -> dict[str, str]:
    """``{distribution name: installed version}`` of ``roots`` and everything they require."""
    found: dict[str, str] = {}
    todo = [(r, frozenset()) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        extras = frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed in {sys.prefix}")
        found[dist.metadata["Name"]] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, extras))
    return found


def main() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS:
        lines += project["optional-dependencies"][extra]
    pins = closure([Requirement(line) for line in lines])
    print("# Exact versions CI and `make` install with (pip install -c constraints.txt ...);")
    print("# regenerate with scripts/freeze_constraints.py. The ranges users get are in pyproject.toml.")
    for name in sorted(pins, key=str.lower):
        version = pins[name].split("+")[0]  # a local label (torch's +cpu) is matched by the public version
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
