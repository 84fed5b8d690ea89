"""``soljax bench convert``: peak host memory of converting (and loading) a >1B-parameter model.

A synthetic Llama checkpoint with random float32 weights (Llama-3.2-1B's shapes by default:
1.24B parameters, 4.9 GB) is written as sharded safetensors with an index, ``config.json`` and
``tokenizer.json`` into a temporary directory. It is converted to the target dtype in a fresh
subprocess, and the converted model is loaded in another one; each reports its own peak RSS
(``ru_maxrss``), compared with the model's size in the target dtype, its largest tensor and the
target "size in the target dtype + 1 GB".
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from soljax.tools.shapes import hf_config

GB = 1e9


def hf_tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of a Llama model with config ``hf``."""
    D, F, V = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not hf["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
                       p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    return shapes


def write_synthetic_llama(out: Path, shape: str = "llama-3.2-1b", shard_bytes: int = 10**9, seed: int = 0,
                          progress=None) -> dict:
    """Writes a random float32 Llama checkpoint (sharded safetensors + index, config, tokenizer)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = {**hf_config(shape), "torch_dtype": "float32"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    vocab = {f"w{i}": i for i in range(hf["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    shapes = hf_tensor_shapes(hf)
    rng = np.random.default_rng(seed)
    groups, size = [[]], 0
    for name, s in shapes.items():
        n = 4 * math.prod(s)
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        if progress:
            progress(f"writing {fname}")
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(shapes[name], np.float32)
            else:
                tensors[name] = rng.standard_normal(shapes[name], dtype=np.float32)
                tensors[name] *= 0.02
            weight_map[name] = fname
        save_file(tensors, str(out / fname))
        del tensors
    total = sum(4 * math.prod(s) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    largest = max(shapes, key=lambda k: math.prod(shapes[k]))
    return {"shape": shape, "parameters": sum(math.prod(s) for s in shapes.values()), "shards": len(groups),
            "largest_tensor": largest, "largest_tensor_parameters": math.prod(shapes[largest])}


def peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM`` where /proc has it (it starts at exec, whereas
    ``ru_maxrss`` starts from the parent's size at fork), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_child(what: str, *args: str) -> dict:
    """In this process: ``convert SRC OUT DTYPE``, ``load DIR DTYPE`` or ``imports`` (only what a
    conversion imports); its seconds and peak RSS."""
    import time

    start = time.perf_counter()
    if what == "convert":
        from soljax.lm.convert import convert

        convert(Path(args[0]), Path(args[1]), dtype=args[2], quiet=True)
    elif what == "load":
        from soljax.lm.checkpoint import load_model

        load_model(Path(args[0]), dtype=args[1])
    else:
        import jax  # noqa: F401
        import orbax.checkpoint  # noqa: F401

        import soljax.lm.checkpoint  # noqa: F401
        import soljax.lm.convert  # noqa: F401
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}


def _child(what: str, *args: str) -> dict:
    """:func:`run_child` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "soljax.tools.bench_convert", what, *args], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_convert(shape: str = "llama-3.2-1b", dtype: str = "bfloat16", tmp: str | None = None,
                  progress=None) -> dict:
    """Builds the synthetic checkpoint, converts it to ``dtype`` and loads it, each in a subprocess."""
    itemsize = 2 if dtype == "bfloat16" else 4
    with tempfile.TemporaryDirectory(prefix="soljax-bench-convert-", dir=tmp) as root:
        src, out = Path(root) / "hf", Path(root) / "converted"
        ckpt = write_synthetic_llama(src, shape, progress=progress)
        if progress:
            progress(f"converting {ckpt['parameters'] / 1e9:.2f}B parameters to {dtype}")
        conv = _child("convert", str(src), str(out), dtype)
        if progress:
            progress("loading the converted model")
        load = _child("load", str(out), dtype)
        base = _child("imports")
    size = ckpt["parameters"] * itemsize
    return {**ckpt, "dtype": dtype, "stored_bytes": 4 * ckpt["parameters"], "target_dtype_bytes": size,
            "largest_tensor_float32_bytes": 4 * ckpt["largest_tensor_parameters"],
            "target_peak_rss_bytes": size + GB, "import_rss_bytes": base["peak_rss_bytes"],
            "convert_peak_rss_bytes": conv["peak_rss_bytes"], "convert_seconds": conv["seconds"],
            "load_peak_rss_bytes": load["peak_rss_bytes"], "load_seconds": load["seconds"],
            "within_target": conv["peak_rss_bytes"] <= size + GB}


def format_table(r: dict) -> str:
    gb = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    rows = [
        ("model", f"synthetic {r['shape']}: {r['parameters'] / 1e9:.3f}B parameters, float32 safetensors "
                  f"in {r['shards']} shards ({gb(r['stored_bytes'])})"),
        (f"size in {r['dtype']}", gb(r["target_dtype_bytes"])),
        ("largest tensor", f"{r['largest_tensor']} ({r['largest_tensor_parameters'] / 1e6:.0f}M parameters, "
                           f"{gb(r['largest_tensor_float32_bytes'])} in float32)"),
        ("python + jax + orbax imports", gb(r["import_rss_bytes"])),
        ("conversion peak RSS", f"{gb(r['convert_peak_rss_bytes'])} ({r['convert_seconds']:.0f} s)"),
        (f"target (size in {r['dtype']} + 1 GB)", f"{gb(r['target_peak_rss_bytes'])}: "
                                                  f"{'met' if r['within_target'] else 'NOT met'}"),
        (f"loading it in {r['dtype']}: peak RSS", f"{gb(r['load_peak_rss_bytes'])} ({r['load_seconds']:.0f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    print(json.dumps(run_child(*sys.argv[1:])))
