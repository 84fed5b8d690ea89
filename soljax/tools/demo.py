"""``soljax demo``: the whole SOL idea end to end on the embedded model.

1. make sure the embedded model and the text corpora are there (fetch and convert if not);
2. train a SOL policy with ``configs/demo.yaml`` (resumes an interrupted run; a finished run is
   reused);
3. evaluate it on held-out Persuasion blocks against budget-matched fixed, random, EMC and DAC
   allocation, dense and static single-axis points (reused when the same checkpoint was already
   evaluated with the same settings);
4. write the report (summary, Pareto plot, budget adherence plot, per-token action picture);
5. generate one sample with the policy next to the dense model's (reused like the evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from soljax.errors import SoljaxError

SAMPLE_PROMPT = "It is a truth universally acknowledged, that"
SAMPLE_TARGETS = (0.5, 0.8, 0.5)


def demo_config_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if not path.is_file():
        raise SoljaxError(f"the demo config is missing ({path}); run the demo from a soljax checkout")
    return path


def demo_sweep_config(quick: bool = False):
    from soljax.eval.sweep import SweepConfig

    if quick:
        return SweepConfig(num_blocks=4, batch_size=4, random_trials=2, targets=((0.3, 0.7, 0.5),),
                           methods=("policy", "fixed", "random", "dense"))
    return SweepConfig(num_blocks=32, batch_size=8, random_trials=10,
                       targets=((0.1, 0.68, 0.45), (0.35, 0.75, 0.55), (0.6, 0.85, 0.75), (0.85, 0.95, 0.9)))


def _say(msg: str) -> None:
    print(f"soljax demo: {msg}", file=sys.stderr, flush=True)


def _reusable(path: Path, checkpoint: int, request: dict) -> dict | None:
    """The record at ``path`` if it was made from ``checkpoint`` with the same ``request``, else None."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = old.get("checkpoint") == checkpoint and old.get("request") == json.loads(json.dumps(request))
    return old if same else None


def run_demo(out_dir: str | Path = "runs/demo", *, overrides: tuple[str, ...] = (), quick: bool = False,
             progress: bool = True) -> dict:
    """Runs the demo into ``out_dir``; returns the paths it wrote. ``overrides``: extra
    ``key=value`` training config overrides; ``quick``: a minutes-long smoke version."""
    from soljax.data.assets import ensure_assets
    from soljax.config import TrainConfig
    from soljax.data.embedded import ensure_embedded_model
    from soljax.eval.sweep import eval_ppl
    from soljax.eval.report import write_report
    from soljax.runs import checkpoint_steps
    from soljax.train import Trainer

    t0 = time.perf_counter()
    out = Path(out_dir)
    _say("[1/5] assets: the embedded SmolLM2-135M-Instruct and the novels")
    ensure_assets(mmlu=False)
    ensure_embedded_model()

    cfg = TrainConfig.load(demo_config_path(), [f"out_dir={out}", *overrides])
    trainer = Trainer(cfg)
    _say(f"[2/5] training a SOL policy ({trainer.num_batches} batches of {cfg.batch_size} blocks x "
         f"{cfg.grpo_rollouts_per_input} schedules x {cfg.rollout_len} steps) into {out}")
    trainer.run(out, resume=True, progress=progress)
    lm = (trainer.lm_cfg, trainer.lm_params, trainer.tokenizer)

    sweep_cfg = demo_sweep_config(quick)
    eval_dir = out / "eval"
    step = checkpoint_steps(out)[-1]
    if _reusable(eval_dir / "sweep.json", step, dataclasses.asdict(sweep_cfg)) is not None:
        _say(f"[3/5] evaluation: reusing {eval_dir / 'sweep.json'} (checkpoint {step})")
    else:
        _say(f"[3/5] evaluating the policy against fixed, random, EMC and DAC allocation on "
             f"{sweep_cfg.num_blocks} held-out Persuasion blocks")
        eval_ppl(out, sweep_cfg, eval_dir, lm=lm, progress=progress)

    _say("[4/5] writing the report")
    paths = write_report(eval_dir)

    sample_json = out / "sample.json"
    request = {"prompt": SAMPLE_PROMPT, "tokens": 8 if quick else 48, "targets": list(SAMPLE_TARGETS)}
    sample = _reusable(sample_json, step, request)
    if sample is not None:
        _say(f"[5/5] sample: reusing {sample_json} (checkpoint {step})")
    else:
        _say("[5/5] a sample with the policy choosing each token's compute")
        from soljax.runs import controlled_model
        from soljax.serve.generate import policy_generation_report

        model = controlled_model(lm[0], lm[1], out)
        sample = policy_generation_report(model, lm[2], [SAMPLE_PROMPT], request["tokens"], SAMPLE_TARGETS,
                                          compare_dense=True, eos_ids=lm[0].eos_token_ids)
        sample.update(checkpoint=step, request=request)
        sample_json.write_text(json.dumps(sample, indent=2))
    paths.update(sample=out / "sample.json", training=out / "training.png", metrics=out / "metrics.jsonl")
    paths["elapsed_s"] = time.perf_counter() - t0
    return {"paths": paths, "sample": sample}


def format_demo(result: dict) -> str:
    """The summary ``soljax demo`` prints: the policy against the baselines, the sample, the files."""
    from soljax.eval.report import load_sweep, summarize
    from soljax.serve.generate import budget_line

    paths = result["paths"]
    lines = ["", "SOL policy vs budget-matched baselines on held-out text (perplexity, lower is better):"]
    for r in summarize(load_sweep(paths["report"].parent))["rows"]:
        p, o = r["policy"], r["others"]
        best = next((m for m in o if m.startswith("random_best")), None)
        lines.append(f"  net keep {p['net_keep']:.3f}: policy {p['ppl']:.2f}"
                     + "".join(f", {m} {o[m]['ppl']:.2f}" for m in ("fixed", best, "emc", "dac") if m in o))
    s = result["sample"]["samples"][0]
    lines += ["", f"[policy] {s['prompt']}{s['controlled']['text']}",
              f"  realized: {budget_line(s['controlled']['budget'])}"]
    if "dense" in s:
        lines += [f"[dense]  {s['prompt']}{s['dense']['text']}",
                  f"  mean log-prob under the dense model: policy's text {s['controlled']['mean_dense_logprob']:.3f}, "
                  f"dense text {s['dense']['mean_dense_logprob']:.3f}"]
    lines += ["", "written:"] + [f"  {name:9s} {path}" for name, path in paths.items() if name != "elapsed_s"]
    return "\n".join(lines)
