"""The ``soljax`` command line: thin entry points that parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from soljax.errors import SoljaxError, Terminated

from soljax.tools import paper_eval
from soljax.tools.demo import SAMPLE_PROMPT as DEMO_PROMPT
from soljax.tools.shapes import SHAPES

NO_REPLAY_HELP = ("skip the dense replay of each finished episode (the reference's KV refresh): the cache keeps "
                  "the K/V entries computed under the chosen compute, which saves a dense pass over the cache "
                  "every episode at the price of that pollution (with --policy)")
GUARD_HELP = ("budget guard: the targets become hard caps on the realized usage of every axis. Generating "
              "(generate, generate_until requests), the mean usage of the tokens so far is at or below every "
              "target after every token, so output cut at EOS or a stop string is within them; scoring "
              "(eval ppl, loglikelihood requests), every episode of the known continuation ends at or below "
              "them. A target below the run grid's cheapest level cannot be capped and is refused")


def _model_dir(arg: str | None, dtype: str | None = None) -> Path:
    if arg:
        from soljax.runs import model_directory

        return model_directory(arg, dtype or "float32")
    from soljax.data.embedded import embedded_model_dir

    path = embedded_model_dir()
    if not (path / "model.json").is_file():
        raise SoljaxError("the embedded model is not set up yet: run `soljax setup` (or pass --model DIR)")
    return path


def _load(arg: str | None, dtype: str | None = None):
    """The LM on every local device (its weights split over a model axis: soljax.parallel.serving_plan)."""
    from soljax.lm.checkpoint import load_model
    from soljax.parallel import serving_lm_sharding

    return load_model(_model_dir(arg, dtype), dtype=dtype, sharding=serving_lm_sharding())


def cmd_setup(args) -> None:
    from soljax.data.assets import ensure_assets
    from soljax.data.embedded import ensure_embedded_model

    paths = ensure_assets(mmlu=not args.no_mmlu)
    model = ensure_embedded_model()
    print(json.dumps({"model": str(model), "gguf": str(paths["model"]),
                      "text": {k: str(v) for k, v in paths["text"].items()},
                      "mmlu": str(paths.get("mmlu", ""))}, indent=2))


def _num_params(cfg) -> int:
    import math

    import jax

    from soljax.lm.params import param_shapes

    shapes = jax.tree_util.tree_leaves(param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
    return sum(math.prod(s) for s in shapes)


def cmd_convert(args) -> None:
    from soljax.lm.convert import check_output_dir, convert
    from soljax.lm.hub import parse_model_id, source_path

    check_output_dir(Path(args.out), args.force)  # before any download
    src = source_path(args.src)
    hf_id = None if src == Path(args.src).expanduser() else parse_model_id(args.src)
    cfg = convert(src, Path(args.out), dtype=args.dtype, force=args.force,
                  source=f"{hf_id[0]}@{src.name}" if hf_id else None)
    print(f"converted {args.src} -> {args.out} ({cfg.arch}, {_num_params(cfg) / 1e6:.1f}M parameters, "
          f"{cfg.dtype})")


def cmd_info(args) -> None:
    from soljax.lm.checkpoint import load_config

    cfg = load_config(_model_dir(args.model))
    print(json.dumps({"config": cfg.to_dict(), "parameters": _num_params(cfg)}, indent=2))


def cmd_generate(args) -> None:
    if args.policy:
        return _generate_controlled(args)
    for given, flag in ((args.targets, "--targets"), (args.compare_dense, "--compare-dense"),
                        (args.controller, "--controller"), (args.step is not None, "--step"),
                        (args.sample_actions, "--sample-actions"), (args.guard, "--guard"), (args.json, "--json"),
                        (args.no_replay, "--no-replay")):
        if given:
            raise SoljaxError(f"{flag} needs --policy RUN_DIR (a training run)")
    from soljax.serve.generate import generate

    cfg, params, tok = _load(args.model, args.dtype)
    prompts = args.prompt or [DEMO_PROMPT]
    start = time.perf_counter()
    outs = generate(cfg, params, [tok.encode(p) for p in prompts], args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    eos_ids=cfg.eos_token_ids)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outs):
        text = tok.decode(out, skip_special_tokens=True)
        cut = min((text.find(s) for s in args.stop or () if s in text), default=-1)
        print(prompt + (text[:cut] if cut >= 0 else text))
        print()
    new = sum(len(o) for o in outs)
    print(f"[{new} new tokens in {elapsed:.1f}s]", file=sys.stderr)


def _generate_controlled(args) -> None:
    """``soljax generate --policy RUN_DIR --targets T,P,Q``: the policy (or fixed) chooses each token's compute."""
    from soljax.compress.targets import parse_target
    from soljax.runs import load_controlled
    from soljax.serve.generate import format_generation_report, policy_generation_report

    if not args.targets:
        raise SoljaxError("--policy needs --targets TOKEN,PRUNE,QUANT (e.g. 0.5,0.7,8)")
    targets = parse_target(args.targets)
    model, tok = load_controlled(args.policy, model_dir=args.model, dtype=args.dtype, step=args.step,
                                 controller=args.controller or "policy", greedy=not args.sample_actions,
                                 guard=args.guard, replay=not args.no_replay, impl=args.impl)
    prompts = args.prompt or [DEMO_PROMPT]
    start = time.perf_counter()
    report = policy_generation_report(model, tok, prompts, args.max_new_tokens, targets,
                                      compare_dense=args.compare_dense, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed, eos_ids=model.cfg.eos_token_ids,
                                      stop=tuple(args.stop or ()))
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(format_generation_report(report, args.controller or "policy"))
    print(f"[generated in {elapsed:.1f}s]", file=sys.stderr)


def cmd_ppl(args) -> None:
    from tqdm import tqdm

    from soljax.eval.ppl import perplexity, windows

    cfg, params, tok = _load(args.model, args.dtype)
    window = min(1024, cfg.max_position_embeddings) if args.window is None else args.window
    cfg.check_length(window, "--window")
    results = []
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise SoljaxError(f"no such file: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SoljaxError(f"{path} is not UTF-8 text") from None
        ids = tok.encode(text)
        n_windows = len(windows(ids, window)[0]) if len(ids) >= 2 else 0
        with tqdm(total=n_windows, desc=path.name, unit="win", disable=args.quiet,
                  file=sys.stderr) as bar:
            r = perplexity(cfg, params, ids, window=window, progress=bar.update)
        results.append({"path": str(path), **r})
    print(json.dumps({"files": results}, indent=2))


def cmd_score_schedules(args) -> None:
    from soljax.eval.schedules import score_schedules

    path = Path(args.input)
    if not path.is_file():
        raise SoljaxError(f"no such file: {path}")
    try:
        spec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SoljaxError(f"{path} is not valid JSON: {e}") from None
    cfg, params, _ = _load(args.model, args.dtype)
    print(json.dumps(score_schedules(cfg, params, spec)))


def cmd_train(args) -> None:
    from soljax import parallel
    from soljax.config import TrainConfig

    flags = {"coordinator_address": args.coordinator_address, "num_processes": args.num_processes,
             "process_id": args.process_id}
    cfg = TrainConfig.load(args.config, args.overrides).replace(**{k: v for k, v in flags.items() if v is not None})
    parallel.initialize_distributed(cfg)  # before anything touches a device (importing soljax.train.trainer does)
    from soljax.train.trainer import train

    out = Path(args.out or cfg.out_dir)
    train(cfg, out, resume=args.resume, progress=not args.quiet)
    if parallel.is_primary():
        print(f"soljax: run written to {out} (metrics.jsonl, training.png, checkpoints/)", file=sys.stderr)


def cmd_bench(args) -> None:
    say = None if args.json else (lambda msg: print(f"soljax: benchmarking {msg}...", file=sys.stderr))
    if args.what == "decode":
        from soljax.tools.bench_decode import bench_decode_cli

        return bench_decode_cli(args, say)
    if args.what == "kernels":
        from soljax.tools.bench_kernels import bench_kernels, format_table

        result = bench_kernels(tuple(args.context or (4096, 32768)), tuple(args.batch), impls=args.impl,
                               dtype=args.dtype, repeats=args.repeats, progress=say)
    elif args.what == "convert":
        from soljax.tools.bench_convert import bench_convert, format_table

        result = bench_convert(args.shape or "llama-3.2-1b", args.dtype or "bfloat16", progress=say)
    elif args.what == "tokenize":
        from soljax.tools.bench_tokenize import bench_tokenize, format_table

        result = bench_tokenize(args.repeats or 3, progress=say)
    else:
        from soljax.tools.bench import bench_rollout, format_table

        result = bench_rollout(tuple(args.context or (256, 1024)), tuple(args.engines), args.repeats or 3,
                               progress=say)
    print(json.dumps(result) if args.json else format_table(result))


def _sweep_config(args):
    from soljax.compress.targets import parse_targets
    from soljax.eval.sweep import SweepConfig

    given = lambda v, default: default if v is None else v  # noqa: E731
    kw = dict(data=given(args.data, "eval"), num_blocks=given(args.blocks, 64), batch_size=given(args.batch_size, 8),
              random_trials=given(args.trials, 30), seed=args.seed, gamma=args.gamma, guard=args.guard,
              split=given(args.split, "test"))
    if args.targets:
        kw["targets"] = parse_targets(args.targets)
    if args.methods:
        kw["methods"] = tuple(args.methods)
    if args.static:
        kw["static"] = tuple(args.static)
    return SweepConfig(**kw)


def cmd_eval_ppl(args) -> None:
    from soljax.eval.sweep import eval_ppl
    from soljax.eval.report import write_report

    if args.protocol == "paper":
        return paper_eval.run(args)
    paper_eval.check_default_protocol(args)

    out = Path(args.out) if args.out else Path(args.run) / "eval"
    result = eval_ppl(args.run, _sweep_config(args), out, progress=not args.quiet)
    paths = write_report(out)
    if args.json:
        print(json.dumps({"points": result["points"]}))
    else:
        print((out / "report.md").read_text())
    print(f"soljax: sweep and report written to {out} ({', '.join(p.name for p in paths.values())}, "
          f"sweep.json, sweep.csv)", file=sys.stderr)


def cmd_eval_report(args) -> None:
    from soljax.eval.report import write_report

    if paper_eval.report(Path(args.sweep)):  # a paper-protocol evaluation
        return
    paths = write_report(Path(args.sweep))
    print(paths["report"].read_text())
    print(f"soljax: report written to {paths['report']}", file=sys.stderr)


def cmd_eval_downstream(args) -> None:
    from soljax.compress.targets import parse_targets
    from soljax.eval.harness import format_downstream, run_downstream

    targets = parse_targets(args.targets)
    tasks = tuple(t for arg in args.tasks for t in arg.split(","))
    result = run_downstream(args.run, targets, tasks=tasks, modes=tuple(args.modes), limit=args.limit,
                            num_fewshot=args.num_fewshot, batch_size=args.batch_size, out_dir=args.out,
                            progress=not args.quiet, mmlu_per_subject=args.mmlu_per_subject, cloze=args.cloze,
                            guard=args.guard)
    print(json.dumps(result) if args.json else format_downstream(result))


def cmd_demo(args) -> None:
    """The main job: assets, training, evaluation against baselines, report, a sample."""
    from soljax.tools.demo import format_demo, run_demo

    result = run_demo(args.out, overrides=tuple(args.overrides), quick=args.quick, progress=not args.quiet)
    paths = result["paths"]
    print(format_demo(result))
    print(f"\n[demo finished in {paths['elapsed_s'] / 60:.1f} min]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soljax", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--cache-dir", help="where assets and converted models live (env SOLJAX_CACHE_DIR)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("setup", help="fetch the embedded model, text corpora and MMLU; convert the model")
    s.add_argument("--no-mmlu", action="store_true", help="skip the MMLU download")
    s.set_defaults(fn=cmd_setup)

    s = sub.add_parser("convert", help="convert a Hugging Face directory or GGUF file")
    s.add_argument("--from", dest="src", required=True, help="HF model directory, .gguf file or Hugging Face "
                   "id org/name[@revision] (from the local HF cache, else downloaded)")
    s.add_argument("--out", required=True, help="output soljax model directory")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--force", action="store_true", help="write into a non-empty --out directory that is not "
                   "a soljax model (an existing soljax model directory is always overwritten)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("info", help="print a converted model's config and parameter count")
    s.add_argument("model", nargs="?", help="soljax model directory or any --model name (default: the embedded "
                   "model)")
    s.set_defaults(fn=cmd_info)

    def model_args(s):
        s.add_argument("--model", help="soljax model directory, HF directory, .gguf file or Hugging Face id "
                       "org/name[@revision] (converted once into the cache; default: the embedded model)")
        s.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype override")

    s = sub.add_parser("generate", help="generation from one or more prompts, dense or with a SOL policy")
    model_args(s)
    s.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", help="stop string (repeatable); the text ends before it")
    s.add_argument("--policy", metavar="RUN_DIR", help="a training run: its policy picks each token's compute "
                   "(default model: the run's)")
    s.add_argument("--targets", metavar="TOKEN,PRUNE,QUANT", help="budget targets: token keep, MLP-input keep, "
                   "quant as bits/16 ratio or bit width (e.g. 0.5,0.7,8)")
    s.add_argument("--step", type=int, help="the run's checkpoint to use (default: the latest)")
    s.add_argument("--controller", choices=["policy", "fixed"], help="policy (default) or the run grid's "
                   "budget-matched fixed schedule")
    s.add_argument("--sample-actions", action="store_true", help="sample the policy's actions (default: greedy)")
    s.add_argument("--guard", action="store_true", help=GUARD_HELP)
    s.add_argument("--compare-dense", action="store_true", help="also show the dense continuation and the mean "
                   "dense log-probability of both, and both decoders' time per token (each generates twice: the "
                   "first run compiles)")
    s.add_argument("--no-replay", action="store_true", help=NO_REPLAY_HELP)
    s.add_argument("--impl", choices=["xla", "pallas", "cpu"], help="with --policy: the decode ops' implementation "
                   "(default: the run's attention_impl and mlp_impl; cpu: the C++ kernels, float32 on the CPU)")
    s.add_argument("--json", action="store_true", help="print the report as JSON (with --policy)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("ppl", help="dense perplexity of text files in non-overlapping windows")
    model_args(s)
    s.add_argument("--window", type=int, help="tokens per window (default 1024, or the model's maximum context "
                   "if shorter)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("files", nargs="+", help="UTF-8 text files")
    s.set_defaults(fn=cmd_ppl)

    s = sub.add_parser("score-schedules", help="log-likelihood of fixed compute schedules on token blocks")
    model_args(s)
    s.add_argument("input", help="JSON with 'blocks', 'schedules' and optional sparsity settings")
    s.set_defaults(fn=cmd_score_schedules)

    s = sub.add_parser("train", help="train a SOL policy with GRPO")
    s.add_argument("--config", help="YAML config (see configs/default.yaml); defaults when omitted")
    s.add_argument("--out", help="run directory (default: the config's out_dir)")
    s.add_argument("--resume", action="store_true", help="continue the run in the output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--coordinator-address", help="multi-process run: HOST:PORT of process 0 (docs/scaleout.md)")
    s.add_argument("--num-processes", type=int, help="multi-process run: number of processes")
    s.add_argument("--process-id", type=int, help="multi-process run: this process's id (0 .. n-1)")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("bench", help="benchmarks (rollout: rollout phase and training update; "
                                     "kernels: dense vs sparse decode attention and MLP; "
                                     "decode: end-to-end decoding, dense vs fixed vs policy; "
                                     "convert: peak memory of converting and loading a 1B+ model; "
                                     "tokenize: tokenization throughput on the embedded corpora)")
    s.add_argument("what", choices=["rollout", "kernels", "decode", "convert", "tokenize"])
    s.add_argument("--context", type=int, nargs="+",
                   help="context lengths (default: 256 1024 for rollout, 4096 32768 for kernels, "
                   "1024 4096 8000 for decode)")
    s.add_argument("--engines", nargs="+", default=["shared", "copied"], choices=["shared", "copied"])
    s.add_argument("--repeats", type=int, help="timed repeats (default: 3; kernels on an accelerator: 20)")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="kernels: batch sizes")
    s.add_argument("--impl", nargs="+", choices=["xla", "pallas", "cpu"],
                   help="kernels: implementations (default: xla, plus pallas on a GPU or TPU; cpu: the C++ "
                        "kernels); decode --shape: the fast path's ops (default xla; pallas: the Pallas "
                        "kernels, interpreted on CPU; cpu: the C++ kernels)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="kernels and decode --shape: data type (default: bfloat16 on accelerators, float32 on "
                        "CPU); convert: target dtype (default bfloat16)")
    s.add_argument("--shape", choices=list(SHAPES),
                   help="convert: the synthetic model's shapes (default llama-3.2-1b; random float32 weights in a "
                        "temporary directory, $TMPDIR); decode: time a model of this shape with random weights "
                        "instead of a run's (dense against constant controls --targets, default 0.1,1,1;0.1,0.5,1, "
                        "at --context, default 32768, per --impl)")
    s.add_argument("--json", action="store_true", help="print the table as JSON")
    s.add_argument("--run", help="decode: the training run whose LM, fixed schedule and policy are timed")
    s.add_argument("--tokens", type=int, default=64, help="decode: timed tokens per row after a warm-up episode "
                   "(default 64)")
    s.add_argument("--targets", metavar="T,P,Q;...", help="decode: target triples for fixed and policy")
    s.add_argument("--data", default="eval", help="decode: the text (default: the eval split)")
    s.add_argument("--masked", action="store_true", help="decode: also time the masked step (methods *-masked)")
    s.add_argument("--no-replay", action="store_true", help="decode: also time episodes without the dense replay "
                   "(methods *-noreplay)")
    s.add_argument("--plot", help="decode: write NLL against ms per token to this PNG")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("eval", help="evaluate a trained policy against baselines")
    ev = s.add_subparsers(dest="eval_command", required=True)
    e = ev.add_parser("ppl", help="perplexity sweep: the policy at several targets vs budget-matched baselines")
    e.add_argument("--run", required=True, help="a training run directory")
    e.add_argument("--out", help="output directory (default: RUN/eval)")
    e.add_argument("--data", help="evaluation text (default: the eval split, Persuasion; with --protocol paper: "
                   "WikiText-2 validation through `datasets`, or a local text file, dataset directory or hf: source "
                   "read the same way)")
    e.add_argument("--blocks", type=int, help="evaluation blocks (default 64)")
    e.add_argument("--batch-size", type=int, help="blocks per compiled call (default 8; paper: 16)")
    e.add_argument("--targets", metavar="T,P,Q;...", help="target triples: token keep, MLP-input keep, "
                   "quant as bits/16 ratio or bit width (default: a diagonal through the grid)")
    e.add_argument("--trials", type=int, help="random schedules per target (best-of-N and mean; default 30)")
    e.add_argument("--methods", nargs="+", help="subset of: policy fixed random emc dac dense static")
    e.add_argument("--static", nargs="+", metavar="KIND:VALUE", help="static points, e.g. quest:0.3 teal:0.6 "
                   "zeroquant:8 (default: one per lower grid level)")
    e.add_argument("--gamma", type=float, default=0.35, help="EMC/DAC signal weight (default 0.35)")
    e.add_argument("--seed", type=int, default=0, help="block choice and random schedules")
    e.add_argument("--guard", action="store_true", help=GUARD_HELP)
    e.add_argument("--split", choices=["valid", "test"], help="valid: the first 64 shuffled "
                   "blocks, for choosing settings; test (default): the blocks after them, for reporting")
    paper_eval.add_arguments(e)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true", help='print {"points": [...]} instead of the report')
    e.set_defaults(fn=cmd_eval_ppl)
    e = ev.add_parser("report", help="Markdown report and figures from a sweep")
    e.add_argument("sweep", help="a sweep directory (RUN/eval) or its sweep.json")
    e.set_defaults(fn=cmd_eval_report)
    e = ev.add_parser("downstream", help="task accuracy with lm_eval: the policy, the matched fixed baseline, dense")
    e.add_argument("--run", required=True, help="a training run directory")
    e.add_argument("--targets", default="0.5,0.8,0.5", metavar="T,P,Q;...", help="target triples: token keep, "
                   "MLP-input keep, quant as bits/16 ratio or bit width (default 0.5,0.8,0.5)")
    e.add_argument("--tasks", nargs="+", default=["soljax_mmlu", "soljax_cloze"], help="lm_eval task names "
                   "(default: the offline soljax_mmlu and soljax_cloze; others need the network)")
    e.add_argument("--modes", nargs="+", default=["policy", "fixed", "dense"], choices=["policy", "fixed", "dense"])
    e.add_argument("--limit", type=int, help="documents per task (default: all)")
    e.add_argument("--num-fewshot", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--mmlu-per-subject", type=int, default=20, help="questions per MMLU subject (3 subjects)")
    e.add_argument("--cloze", type=int, default=60, help="cloze passages from the evaluation corpus")
    e.add_argument("--out", help="output directory (default: RUN/downstream)")
    e.add_argument("--guard", action="store_true", help=GUARD_HELP)
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(fn=cmd_eval_downstream)

    s = sub.add_parser("demo", help="the main job: train a SOL policy on the embedded model, evaluate it "
                       "against fixed and random allocation, write a report, generate a sample")
    s.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; rerunning resumes or "
                   "reuses what is there)")
    s.add_argument("--quick", action="store_true", help="a minutes-long smoke version (a tiny evaluation)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's informational warnings
    if args.cache_dir:
        os.environ["SOLJAX_CACHE_DIR"] = str(Path(args.cache_dir).absolute())
    try:
        args.fn(args)
    except SoljaxError as e:
        if args.debug:
            raise
        print(f"soljax: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("soljax: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("soljax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
