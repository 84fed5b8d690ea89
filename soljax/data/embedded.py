"""The embedded default model: SmolLM2-135M-Instruct, converted once into the cache."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from soljax.data import assets

NAME = "smollm2-135m-instruct"


def embedded_model_dir(cache: Path | str | None = None) -> Path:
    """Where the converted embedded model lives (``<cache>/models/smollm2-135m-instruct``)."""
    return (Path(cache) if cache else assets.cache_dir()) / "models" / NAME


def ensure_embedded_model(cache: Path | str | None = None) -> Path:
    """Fetches and converts the embedded model if needed; returns its soljax model directory."""
    out = embedded_model_dir(cache)
    if (out / "model.json").is_file():
        return out
    from soljax.lm.convert import convert

    gguf = assets.fetch_embedded_gguf(cache)
    print(f"soljax: converting the embedded model into {out}", file=sys.stderr)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(gguf, tmp, quiet=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # model.json appears only once everything is written
    return out
