"""``soljax convert``: Hugging Face directories and GGUF files into soljax model directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from soljax.errors import SoljaxError
from soljax.lm.checkpoint import FORMAT, save_model
from soljax.lm.config import LMConfig
from soljax.lm.keymap import hf_to_params
from soljax.lm.tokenizer import Tokenizer


def read_hf(directory: Path, say: Callable[[str], None] | None = None, dtype: str = "float32"):
    """``(cfg, numpy params in dtype, tokenizer)`` from an HF directory (config.json +
    safetensors), read one block of a tensor at a time (see :func:`~soljax.lm.keymap.hf_to_params`).

    ``say`` hears a progress message once the config and tensor headers are checked, before the
    tensors are read.
    """
    from soljax.lm.safetensors_io import SafetensorsDir

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise SoljaxError(f"{directory} has no config.json (expected a Hugging Face model directory)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise SoljaxError(f"{cfg_path} is not valid JSON: {e}") from None
    cfg = LMConfig.from_hf(hf_cfg)
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise SoljaxError(f"{directory} has no tokenizer.json (a fast tokenizer file is required)")
    tensors = SafetensorsDir(directory)
    if cfg.tie_word_embeddings is False and "lm_head.weight" not in tensors.keys():
        cfg = cfg.replace(tie_word_embeddings=True)  # some checkpoints tie without saying so
    if say is not None:
        say(f"reading {directory}")
    return cfg, hf_to_params(cfg, tensors, np_dtype(dtype)), Tokenizer.from_file(tok_path)


def read_gguf(path: Path, say: Callable[[str], None] | None = None, dtype: str = "float32"):
    """``(cfg, numpy params in dtype, tokenizer)`` from a GGUF file (tensors dequantized through
    float32 a block at a time); ``say`` as in :func:`read_hf`."""
    from soljax.lm.gguf_io import GGUFTensors, config_from_gguf, open_gguf, tokenizer_json_from_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    tensors = GGUFTensors(reader, cfg)
    if say is not None:
        say(f"reading {path}")
    return cfg, hf_to_params(cfg, tensors, np_dtype(dtype)), Tokenizer(tokenizer_json_from_gguf(reader))


def np_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a parameter dtype name ("float32" or "bfloat16")."""
    if dtype not in ("float32", "bfloat16"):
        raise SoljaxError(f"unsupported parameter dtype {dtype!r} (expected float32 or bfloat16)")
    return np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)


def read_checkpoint(src: Path, say: Callable[[str], None] | None = None, dtype: str = "float32"):
    """``(cfg, numpy params in dtype, tokenizer)`` from an HF directory or a GGUF file."""
    src = Path(src)
    if not src.exists():
        raise SoljaxError(f"no such file or directory: {src}")
    if src.is_dir():
        return read_hf(src, say, dtype)
    if src.suffix.lower() == ".gguf":
        return read_gguf(src, say, dtype)
    raise SoljaxError(f"{src}: expected a Hugging Face model directory or a .gguf file")


def check_output_dir(out: Path, force: bool = False) -> None:
    """Refuses an output path that is a file, or a non-empty directory that is not a soljax model
    (unless ``force``); an existing soljax model directory is overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SoljaxError(f"{out} exists and is not a directory")
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        meta = json.loads((out / "model.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
        raise SoljaxError(f"{out} is a non-empty directory that is not a soljax model: choose another --out "
                          "or pass --force to write into it")


def convert(src: Path, out: Path, dtype: str = "float32", quiet: bool = False, force: bool = False,
            source: str | None = None) -> LMConfig:
    """Converts ``src`` (HF directory or GGUF file) into a soljax model directory ``out``.

    ``out`` may be new, empty or an existing soljax model directory (overwritten); any other
    non-empty directory is refused unless ``force``. The conversion streams: tensors are read,
    cast to ``dtype`` and placed a block at a time, and the parameters are written without a
    copy, so the peak memory is about the model's size in ``dtype`` (never the float32 model).
    ``source`` is recorded in ``model.json`` (default: the name of ``src``).
    """
    check_output_dir(out, force)
    np_dtype(dtype)
    say = None if quiet else (lambda msg: print(f"soljax: {msg}", file=sys.stderr))
    cfg, np_params, tokenizer = read_checkpoint(src, say, dtype)
    cfg = cfg.replace(dtype=dtype)
    if say is not None:
        say(f"writing {out}")
    save_model(out, cfg, np_params, tokenizer, source=source or str(Path(src).name))
    return cfg
