"""``soljax convert``: Hugging Face directories and GGUF files into soljax model directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from soljax.errors import SoljaxError
from soljax.lm.checkpoint import params_from_numpy, save_model
from soljax.lm.config import LMConfig
from soljax.lm.keymap import hf_to_params
from soljax.lm.tokenizer import Tokenizer


def read_hf(directory: Path):
    """``(cfg, numpy params, tokenizer)`` from an HF directory (config.json + safetensors)."""
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
    return cfg, hf_to_params(cfg, tensors), Tokenizer.from_file(tok_path)


def read_gguf(path: Path):
    """``(cfg, numpy params, tokenizer)`` from a GGUF file (tensors dequantized to float32)."""
    from soljax.lm.gguf_io import GGUFTensors, config_from_gguf, open_gguf, tokenizer_json_from_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    return cfg, hf_to_params(cfg, GGUFTensors(reader, cfg)), Tokenizer(tokenizer_json_from_gguf(reader))


def read_checkpoint(src: Path):
    src = Path(src)
    if not src.exists():
        raise SoljaxError(f"no such file or directory: {src}")
    if src.is_dir():
        return read_hf(src)
    if src.suffix.lower() == ".gguf":
        return read_gguf(src)
    raise SoljaxError(f"{src}: expected a Hugging Face model directory or a .gguf file")


def convert(src: Path, out: Path, dtype: str = "float32", quiet: bool = False) -> LMConfig:
    """Converts ``src`` (HF directory or GGUF file) into a soljax model directory ``out``."""
    if not quiet:
        print(f"soljax: reading {src}", file=sys.stderr)
    cfg, np_params, tokenizer = read_checkpoint(src)
    cfg = cfg.replace(dtype=dtype)
    params = params_from_numpy(cfg, np_params)
    if not quiet:
        print(f"soljax: writing {out}", file=sys.stderr)
    save_model(out, cfg, params, tokenizer, source=str(Path(src).name))
    return cfg
