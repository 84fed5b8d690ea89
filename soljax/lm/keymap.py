"""Declarative map between Hugging Face parameter names and the soljax parameter tree.

Each rule names an HF key pattern (``{i}`` is the layer index), the soljax leaf, and how the
tensor is laid out. The same table drives import (HF -> soljax) and export (soljax -> HF), so a
round trip is exact. Linear weights in HF are ``[out, in]``; soljax stores ``x @ W`` layouts
with heads split out, e.g. ``wq [D, Hq, Dh]`` and ``wo [Hq, Dh, D]``.

Import streams: each tensor is read a block of rows at a time (at most :data:`BLOCK_BYTES` of
float32), cast to the target dtype and written into its place in the parameter tree, so the only
full copy of the model in memory is the tree itself, in the target dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from soljax.errors import SoljaxError
from soljax.lm.config import LMConfig
from soljax.lm.params import param_shapes

#: Float32 bytes of one tensor read, cast and written at a time while importing.
BLOCK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF key, with {i} for the layer index
    ours: str  # leaf name; "layers.NAME" for stacked per-layer leaves
    in_axes: int | None = None  # k: transposed; the first k of our axes form HF's "in" axis
    flat: bool = False  # HF stores the tensor flattened (biases split into heads here)

    def fill(self, dest: np.ndarray, source, key: str) -> None:
        """Writes HF tensor ``key`` of ``source`` (see :func:`hf_to_params`) into ``dest`` (our
        layout, any float dtype), a block of rows at a time, each block cast through float32."""
        shape = tuple(source.shape(key))
        if math.prod(shape) != dest.size:
            raise SoljaxError(f"tensor {self.hf}: expected {tuple(dest.shape)}, found shape {shape}")
        n = shape[0] if shape else 1
        row = math.prod(shape[1:]) if shape else 1
        step = max(1, BLOCK_BYTES // (4 * max(row, 1)))
        transposed = self.in_axes is not None
        if transposed and len(shape) != 2:  # not a matrix: transpose it whole
            dest[...] = np.asarray(source.rows(key, 0, n), np.float32).T.reshape(dest.shape)
            return
        view = _view(dest, (shape[1], n) if transposed else (n, row))  # HF rows: our columns if transposed
        for a in range(0, n, step):
            b = min(n, a + step)
            block = np.asarray(source.rows(key, a, b), np.float32).reshape(b - a, row)
            if transposed:
                view[:, a:b] = block.T
            else:
                view[a:b] = block

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.in_axes is None:
            return w.reshape(-1) if self.flat else w
        rows = math.prod(w.shape[: self.in_axes])
        return w.reshape(rows, -1).T


HF_RULES = (
    Rule("model.embed_tokens.weight", "embed"),
    Rule("model.norm.weight", "final_norm"),
    Rule("lm_head.weight", "lm_head", in_axes=1),
    Rule("model.layers.{i}.input_layernorm.weight", "layers.attn_norm"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm"),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.wq", in_axes=1),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "layers.wk", in_axes=1),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "layers.wv", in_axes=1),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "layers.wo", in_axes=2),
    Rule("model.layers.{i}.self_attn.q_proj.bias", "layers.bq", flat=True),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "layers.bk", flat=True),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "layers.bv", flat=True),
    Rule("model.layers.{i}.self_attn.o_proj.bias", "layers.bo"),
    Rule("model.layers.{i}.self_attn.q_norm.weight", "layers.q_norm"),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "layers.k_norm"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "layers.w_gate", in_axes=1),
    Rule("model.layers.{i}.mlp.up_proj.weight", "layers.w_up", in_axes=1),
    Rule("model.layers.{i}.mlp.down_proj.weight", "layers.w_down", in_axes=1),
)

# GGUF tensor names (llama.cpp) -> HF names.
GGUF_TO_HF = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_HF_PATTERNS = [(_pattern(r.hf), r) for r in HF_RULES]
_GGUF_PATTERNS = [(_pattern(g), h) for g, h in GGUF_TO_HF]

# HF keys that carry no parameters soljax needs.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def gguf_name_to_hf(name: str) -> str | None:
    for pat, hf in _GGUF_PATTERNS:
        m = pat.match(name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    return None


def match_hf(key: str) -> tuple[Rule, int | None] | None:
    for pat, rule in _HF_PATTERNS:
        m = pat.match(key)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    return None


def _view(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` reshaped without copying (raises if that is impossible), so writes land in ``x``."""
    v = x.view()
    v.shape = shape
    return v


class _Arrays:
    """A mapping HF key -> array seen as a tensor source (``keys``, ``shape``, ``rows``)."""

    def __init__(self, tensors):
        self._t = tensors

    def keys(self):
        return self._t.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._t[key]))

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        x = np.asarray(self._t[key])
        return x[start:stop] if x.ndim else x


def hf_to_params(cfg: LMConfig, tensors, dtype=np.float32) -> dict:
    """Builds the soljax parameter tree (numpy, in ``dtype``) from ``tensors``, streaming.

    ``tensors`` is a tensor source: ``keys()``, ``shape(key)`` and ``rows(key, start, stop)``
    (rows of the HF tensor along its first axis, any float dtype), as
    :class:`~soljax.lm.safetensors_io.SafetensorsDir` and :class:`~soljax.lm.gguf_io.GGUFTensors`
    are; or a plain mapping HF key -> array. Each tensor is read and cast a block of rows at a
    time (see :data:`BLOCK_BYTES`). Missing or unexpected tensors and shape mismatches raise
    :class:`SoljaxError`.
    """
    source = tensors if hasattr(tensors, "rows") else _Arrays(tensors)
    dtype = np.dtype(dtype)
    shapes = param_shapes(cfg)
    out: dict = {k: None for k in shapes if k != "layers"}
    out["layers"] = {}
    filled: dict[str, set] = {}
    for key in source.keys():
        if _IGNORED.match(key):
            continue
        found = match_hf(key)
        if found is None:
            raise SoljaxError(f"unexpected tensor {key!r} for a {cfg.arch} model")
        rule, layer = found
        if rule.ours == "lm_head" and cfg.tie_word_embeddings:
            continue
        if rule.ours.startswith("layers."):
            name = rule.ours.split(".", 1)[1]
            if name not in shapes["layers"]:
                raise SoljaxError(f"unexpected tensor {key!r}: the config has no {name}")
            full = shapes["layers"][name]
            if layer >= cfg.num_layers:
                raise SoljaxError(f"tensor {key!r} is past the config's {cfg.num_layers} layers")
            if name not in out["layers"]:
                out["layers"][name] = np.empty(full, dtype)
            rule.fill(out["layers"][name][layer], source, key)
            filled.setdefault(name, set()).add(layer)
        else:
            if rule.ours not in shapes:
                raise SoljaxError(f"unexpected tensor {key!r}: the config has no {rule.ours}")
            if out[rule.ours] is None:
                out[rule.ours] = np.empty(shapes[rule.ours], dtype)
            rule.fill(out[rule.ours], source, key)
    missing = [k for k, v in out.items() if k != "layers" and v is None]
    for name, full in shapes["layers"].items():
        absent = set(range(full[0])) - filled.get(name, set())
        if absent:
            missing.append(f"layers.{name} (layers {sorted(absent)[:5]}...)")
    if missing:
        raise SoljaxError(f"checkpoint is missing tensors: {', '.join(missing)}")
    return out


def params_to_hf(cfg: LMConfig, params: dict) -> dict[str, np.ndarray]:
    """Exports a soljax parameter tree to an HF-named dict of numpy arrays."""
    out = {}
    for rule in HF_RULES:
        if rule.ours.startswith("layers."):
            name = rule.ours.split(".", 1)[1]
            if name in params["layers"]:
                stacked = np.asarray(params["layers"][name])
                for i in range(cfg.num_layers):
                    out[rule.hf.replace("{i}", str(i))] = rule.to_hf(stacked[i])
        elif rule.ours in params:
            out[rule.hf] = rule.to_hf(np.asarray(params[rule.ours]))
    return out
