"""Measures how far chaotic (quantized) golden statistics move with program shape and CPU codegen.

Quantized schedules flip single rounding decisions under last-bit differences (summation order,
vector width), and a flip cascades through later layers and steps. This script scores the golden
blocks of ``tests/fixtures/golden`` under many program shapes (batch composition, block order,
which schedules share a batch) and prints, per schedule, the statistic the agreement tests use
(mean log-prob of the true token over the 8 reference blocks x 16 steps) for each variant, with its
spread and its distance from the reference. Run it once per CPU-codegen setting, e.g.

    python scripts/golden_spread.py
    XLA_FLAGS=--xla_cpu_max_isa=AVX python scripts/golden_spread.py
    XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 python scripts/golden_spread.py

and derive the test bounds from the pooled spread (tests/test_golden_rollouts.py says how).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from golden import HIDDEN, NAMES, REF, SCFG, M, schedules  # noqa: E402

from soljax.data.embedded import ensure_embedded_model  # noqa: E402
from soljax.lm.checkpoint import load_model  # noqa: E402
from soljax.eval.schedules import run_schedules  # noqa: E402


def main() -> None:
    cfg, params, _ = load_model(ensure_embedded_model())
    blocks = np.array(REF["aggregate_8blocks"]["token_ids"])
    kappa, rho, bits = schedules()
    n = len(blocks)

    def score(rows: list[int], cols: list[int]) -> np.ndarray:
        """Log-probs ``[len(rows), len(cols), T]`` of blocks ``rows`` under schedules ``cols``."""
        idx = jnp.array(cols)
        return np.asarray(run_schedules(cfg, SCFG, params, jnp.array(blocks[rows]), kappa[idx], rho[idx],
                                        bits[idx], M).logprobs)

    variants: dict[str, np.ndarray] = {}  # name -> [8 blocks, 6 schedules, T]
    everything = list(range(len(NAMES)))
    variants["8 rows, all schedules"] = score(list(range(n)), everything)
    order = np.random.default_rng(0).permutation(n)
    variants["8 rows, permuted"] = score(list(order), everything)[np.argsort(order)]
    variants["8 rows reversed"] = score(list(range(n))[::-1], everything)[::-1]
    variants["1 row each"] = np.concatenate([score([b], everything) for b in range(n)])
    variants["2 rows each"] = np.concatenate([score([b, b + 1], everything) for b in range(0, n, 2)])
    variants["4 rows each"] = np.concatenate([score(list(range(b, b + 4)), everything) for b in range(0, n, 4)])
    one_at_a_time = np.stack([score(list(range(n)), [k])[:, 0] for k in everything], axis=1)
    variants["8 rows, one schedule per batch"] = one_at_a_time
    quant = [NAMES.index(s) for s in ("d_q6", "e_keep0.2_prune0.5_q5", "f_varying")]
    q_only = variants["8 rows, all schedules"].copy()
    q_only[:, quant] = score(list(range(n)), quant)
    variants["8 rows, quantized schedules only"] = q_only

    agg = REF["aggregate_8blocks"]["schedules"]
    result = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "schedules": {}, "golden_block": {}}
    print(f"XLA_FLAGS={result['xla_flags']!r}")
    # per-step agreement on the golden block, run alone (what the per-step tests check)
    alone = run_schedules(cfg, SCFG, params, jnp.array([REF["blocks"][0]["token_ids"]]), kappa, rho, bits, M)
    for name in ("a_dense", "b_keep0.3", "c_prune0.6"):
        k = NAMES.index(name)
        diff = np.abs(np.asarray(alone.logprobs[0, k]) - np.array(REF["results"][name]["per_block"][0]["lp_gt"]))
        result["golden_block"][name] = {"max_abs_step_diff": float(diff.max()),
                                        "steps_above_1e-3": int((diff > 1e-3).sum())}
        print(f"golden block {name:12s} max |step diff| {diff.max():.2e}  steps > 1e-3: {(diff > 1e-3).sum()}")
    kept = np.asarray(alone.kept_keys[0, NAMES.index("b_keep0.3")])
    ref_kept = HIDDEN["questkept_b_keep0.3"][:, :, 0, :].transpose(1, 0, 2)
    result["golden_block"]["kept_count_agreement"] = float((kept == ref_kept).mean())
    print(f"golden block b_keep0.3 kept-key counts equal in {(kept == ref_kept).mean():.4f} of (step, layer, head)")
    for k, name in enumerate(NAMES):
        means = {v: float(a[:, k].mean()) for v, a in variants.items()}
        ref = agg[name]["mean_lp_8row_batch"]
        values = np.array(list(means.values()))
        result["schedules"][name] = {"ref_8row": ref, "ref_1row": agg[name]["mean_lp_1row_batches"],
                                     "ours": means, "std": float(values.std(ddof=1)),
                                     "max_abs_diff_to_ref": float(np.abs(values - ref).max())}
        print(f"{name:24s} ref {ref:+.4f}  ours {values.min():+.4f}..{values.max():+.4f}  "
              f"std {values.std(ddof=1):.4f}  max |ours - ref| {np.abs(values - ref).max():.4f}")
    out = os.environ.get("GOLDEN_SPREAD_OUT")
    if out:
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
