"""The reference implementation's golden numbers, kept in ``tests/fixtures/golden`` (see its README).

Importing this module fails when a fixture is missing: agreement with the reference is checked in
every clone, never skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from soljax.lm.controlled import SparsityConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "golden"


def _path(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        raise FileNotFoundError(f"golden fixture {path} is missing: the agreement tests need it")
    return path


REF = json.loads(_path("reference_rollouts.json").read_text())
HIDDEN = np.load(_path("reference_rollouts_hidden.npz"), allow_pickle=False)
UNIT = np.load(_path("reference_unit_fixtures.npz"), allow_pickle=False)

NAMES = list(REF["action_schedules"])
QUANTIZED = ("d_q6", "e_keep0.2_prune0.5_q5", "f_varying")
M = REF["settings"]["M_context"]
SCFG = SparsityConfig(criterion="quest", page_size=REF["settings"]["quest_page_size"],
                      sink_tokens=REF["settings"]["Ts"], window_tokens=REF["settings"]["Tw"])


def schedules() -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """``kappa, rho, bits [K, T]`` of the golden schedules, in ``NAMES`` order."""
    s = REF["action_schedules"]
    return (jnp.array([s[n]["kappa"] for n in NAMES], jnp.float32),
            jnp.array([s[n]["rho"] for n in NAMES], jnp.float32),
            jnp.array([s[n]["bits"] for n in NAMES], jnp.int32))
