"""The ``soljax`` command line: thin entry points that parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from soljax.errors import SoljaxError

DEMO_PROMPT = "It is a truth universally acknowledged, that"


def _model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from soljax.embedded import embedded_model_dir

    path = embedded_model_dir()
    if not (path / "model.json").is_file():
        raise SoljaxError("the embedded model is not set up yet: run `soljax setup` (or pass --model DIR)")
    return path


def _load(arg: str | None, dtype: str | None = None):
    from soljax.lm.checkpoint import load_model

    return load_model(_model_dir(arg), dtype=dtype)


def cmd_setup(args) -> None:
    from soljax.assets import ensure_assets
    from soljax.embedded import ensure_embedded_model

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
    from soljax.convert import convert

    cfg = convert(Path(args.src), Path(args.out), dtype=args.dtype)
    print(f"converted {args.src} -> {args.out} ({cfg.arch}, {_num_params(cfg) / 1e6:.1f}M parameters, "
          f"{cfg.dtype})")


def cmd_info(args) -> None:
    from soljax.lm.checkpoint import load_config

    cfg = load_config(_model_dir(args.model))
    print(json.dumps({"config": cfg.to_dict(), "parameters": _num_params(cfg)}, indent=2))


def cmd_generate(args) -> None:
    from soljax.generate import generate

    cfg, params, tok = _load(args.model, args.dtype)
    prompts = args.prompt or [DEMO_PROMPT]
    start = time.perf_counter()
    outs = generate(cfg, params, [tok.encode(p) for p in prompts], args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    eos_ids=cfg.eos_token_ids)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outs):
        print(prompt + tok.decode(out, skip_special_tokens=True))
        print()
    new = sum(len(o) for o in outs)
    print(f"[{new} new tokens in {elapsed:.1f}s]", file=sys.stderr)


def cmd_ppl(args) -> None:
    from tqdm import tqdm

    from soljax.ppl import perplexity, windows

    cfg, params, tok = _load(args.model, args.dtype)
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
        n_windows = len(windows(ids, args.window)[0]) if len(ids) >= 2 else 0
        with tqdm(total=n_windows, desc=path.name, unit="win", disable=args.quiet,
                  file=sys.stderr) as bar:
            r = perplexity(cfg, params, ids, window=args.window, progress=bar.update)
        results.append({"path": str(path), **r})
    print(json.dumps({"files": results}, indent=2))


def cmd_score_schedules(args) -> None:
    from soljax.schedules import score_schedules

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
    from soljax.config import TrainConfig
    from soljax.train import train

    cfg = TrainConfig.load(args.config, args.overrides)
    out = Path(args.out or cfg.out_dir)
    train(cfg, out, resume=args.resume, progress=not args.quiet)
    print(f"soljax: run written to {out} (metrics.jsonl, training.png, checkpoints/)", file=sys.stderr)


def cmd_bench(args) -> None:
    from soljax.bench import bench_rollout, format_table

    say = None if args.json else (lambda msg: print(f"soljax: benchmarking {msg}...", file=sys.stderr))
    result = bench_rollout(tuple(args.context), tuple(args.engines), args.repeats, progress=say)
    print(json.dumps(result) if args.json else format_table(result))


def cmd_demo(args) -> None:
    """The main job on the embedded default (grows into the full SOL demo)."""
    cmd_setup(argparse.Namespace(no_mmlu=False))
    cmd_generate(argparse.Namespace(model=None, dtype=None, prompt=[DEMO_PROMPT], max_new_tokens=48,
                                    temperature=0.0, top_p=1.0, seed=0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soljax", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--cache-dir", help="where assets and converted models live (env SOLJAX_CACHE_DIR)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("setup", help="fetch the embedded model, text corpora and MMLU; convert the model")
    s.add_argument("--no-mmlu", action="store_true", help="skip the MMLU download")
    s.set_defaults(fn=cmd_setup)

    s = sub.add_parser("convert", help="convert a Hugging Face directory or GGUF file")
    s.add_argument("--from", dest="src", required=True, help="HF model directory or .gguf file")
    s.add_argument("--out", required=True, help="output soljax model directory")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("info", help="print a converted model's config and parameter count")
    s.add_argument("model", nargs="?", help="soljax model directory (default: the embedded model)")
    s.set_defaults(fn=cmd_info)

    def model_args(s):
        s.add_argument("--model", help="soljax model directory (default: the embedded model)")
        s.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype override")

    s = sub.add_parser("generate", help="dense generation from one or more prompts")
    model_args(s)
    s.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("ppl", help="dense perplexity of text files in non-overlapping windows")
    model_args(s)
    s.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
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
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("bench", help="benchmarks (rollout: rollout phase and training update)")
    s.add_argument("what", choices=["rollout"])
    s.add_argument("--context", type=int, nargs="+", default=[256, 1024], help="context lengths M")
    s.add_argument("--engines", nargs="+", default=["shared", "copied"], choices=["shared", "copied"])
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--json", action="store_true", help="print the table as JSON")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("demo", help="the main job on the embedded default")
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
    except KeyboardInterrupt:
        print("soljax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
