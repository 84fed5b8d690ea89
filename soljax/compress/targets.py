"""Budget targets: one fraction per axis (token keep, MLP-input keep, quant ratio bits / 16).

One parser for every command that takes targets: ``TOKEN,PRUNE,QUANT`` where QUANT is a ratio in
(0, 1] or a bit width in 2..16; several triples are separated by ``;``.
"""

from __future__ import annotations

import numpy as np

from soljax.errors import SoljaxError


def as_targets(targets, batch: int) -> np.ndarray:
    """Budget targets ``[B, 3]`` (token keep, prune keep, quant ratio bits/16) from ``[3]`` or ``[B, 3]``."""
    try:
        arr = np.asarray(targets, np.float64)
    except (TypeError, ValueError):
        raise SoljaxError(f"budget targets must be numbers, got {targets!r}") from None
    if arr.shape == (3,):
        arr = np.broadcast_to(arr, (batch, 3))
    if arr.shape != (batch, 3):
        raise SoljaxError(f"budget targets need shape [3] or [{batch}, 3] (token, prune, quant ratio), "
                          f"got {list(arr.shape)}")
    if not (np.isfinite(arr).all() and (arr > 0).all() and (arr <= 1).all()):
        raise SoljaxError("budget targets must be in (0, 1]: token keep, prune keep, quant ratio (bits / 16)")
    return arr.astype(np.float32)


def parse_target(text: str) -> tuple[float, float, float]:
    """``"TOKEN,PRUNE,QUANT"`` -> a target triple; QUANT is a ratio bits/16 (<= 1) or a bit width (2..16)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise SoljaxError(f"a target needs three comma-separated values TOKEN,PRUNE,QUANT, got {text!r}")
    try:
        tok, prune, quant = (float(p) for p in parts)
    except ValueError:
        raise SoljaxError(f"target values must be numbers, got {text!r}") from None
    if quant > 1:
        if not 2 <= quant <= 16:
            raise SoljaxError(f"target {text!r}: QUANT {quant:g} is neither a ratio in (0, 1] nor a bit width in 2..16")
        quant /= 16.0
    as_targets((tok, prune, quant), 1)
    return tok, prune, quant


def parse_targets(text: str) -> tuple[tuple[float, float, float], ...]:
    """``"0.5,0.8,0.5;0.3,0.6,5"`` -> target triples (see :func:`parse_target`)."""
    out = tuple(parse_target(p) for p in str(text).split(";") if p.strip())
    if not out:
        raise SoljaxError("no targets given")
    return out
