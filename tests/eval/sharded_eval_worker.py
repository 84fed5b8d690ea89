"""Subprocess side of tests/eval/test_sharded_eval.py: evaluation, scoring and generation as the
library entry points load the LM (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set by the
caller; in the test process itself there is one device).

``python tests/eval/sharded_eval_worker.py ROOT``: ROOT holds ``model/`` (a converted tiny LM),
``run/`` (a training run on it) and ``text.txt``; prints one JSON object: the results of
:func:`evaluate` and where the arrays went (:func:`placement`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = [[5, 9, 3, 1, 2, 8, 8, 4, 11, 13, 2, 7], [7, 3, 17, 30, 2, 9, 41]]
CONTINUATIONS = [[4, 8, 15, 16, 23, 42, 4, 8, 1], [6, 6, 2, 9, 12]]
TARGETS = (0.5, 0.6, 0.5)


def schedules_spec(cfg) -> dict:
    blocks = [[(7 * i + 3 * b) % cfg.vocab_size for i in range(24)] for b in range(2)]
    T = 4
    return {"blocks": blocks, "page_size": 4, "Ts": 1, "Tw": 1,
            "schedules": [{"name": "dense", "kappa": [1.0] * T, "rho": [1.0] * T, "bits": [16] * T},
                          {"name": "sparse", "kappa": [0.3, 1.0, 0.5, 0.3], "rho": [0.6, 1.0, 0.6, 0.8],
                           "bits": [5, 16, 8, 6]}]}


def evaluate(root: Path) -> dict:
    """The same calls as ``soljax eval ppl``, ``soljax generate --policy``, the lm_eval adapter's
    scoring, ``soljax score-schedules`` and ``soljax ppl``, each loading its LM itself."""
    from soljax.cli import _load
    from soljax.eval.ppl import perplexity
    from soljax.eval.schedules import score_schedules
    from soljax.eval.sweep import SweepConfig, eval_ppl
    from soljax.runs import load_controlled
    from soljax.serve.generate import controlled_generate, score_continuations

    out = {}
    model, _ = load_controlled(root / "run")
    out["continuations"] = [s.logprobs.tolist() for s in score_continuations(model, PROMPTS, CONTINUATIONS, TARGETS)]
    out["generated"] = [g.tokens for g in controlled_generate(model, PROMPTS, 6, TARGETS)]
    sweep = eval_ppl(root / "run", SweepConfig(data=str(root / "text.txt"), num_blocks=4, batch_size=4,
                                               random_trials=2, methods=("policy", "fixed", "dense"),
                                               split="valid", targets=((0.5, 0.8, 0.6),)),
                     root / "eval_out", progress=False)
    out["sweep"] = {p["method"]: p["ppl"] for p in sweep["points"]}
    cfg, params, _ = _load(str(root / "model"))
    out["schedules"] = [r["mean_logprob"] for r in score_schedules(cfg, params, schedules_spec(cfg))["results"]]
    out["ppl"] = perplexity(cfg, params, [(5 * i + 1) % cfg.vocab_size for i in range(90)], window=32)["ppl"]
    out["placement"] = placement(model)
    return out


def placement(model) -> dict:
    """Where the controlled model's LM weights and policy went: per LM tensor its PartitionSpec and
    the shape of one device's shard; the policy's device count and whether it is replicated."""
    import jax

    lm = {jax.tree_util.keystr(p): [list(x.sharding.spec) if hasattr(x.sharding, "spec") else None,
                                    list(x.addressable_shards[0].data.shape), list(x.shape)]
          for p, x in jax.tree_util.tree_flatten_with_path(model.params)[0]}
    pol = jax.tree.leaves(model.ctrl_params)
    return {"lm": lm, "policy_devices": sorted({len(x.sharding.device_set) for x in pol}),
            "policy_replicated": all(x.sharding.is_fully_replicated for x in pol), "devices": len(jax.devices())}


if __name__ == "__main__":
    print(json.dumps(evaluate(Path(sys.argv[1]))))
