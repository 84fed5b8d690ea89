"""Configuration of the frozen language model (Llama, SmolLM2, Qwen2, Qwen3 families)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from soljax.errors import SoljaxError

ARCHS = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3`` uses all fields; ``linear`` only ``factor``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise SoljaxError(
                f"unsupported rope scaling type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
            )
        if self.factor <= 0:
            raise SoljaxError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise SoljaxError("llama3 rope scaling needs high_freq_factor > low_freq_factor > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Shapes and numerics of a decoder-only Llama-family model.

    ``qkv_bias`` (Qwen2) adds biases to the q/k/v projections, ``o_bias`` to the output projection
    (Llama's ``attention_bias``), ``qk_norm`` (Qwen3) applies an RMSNorm over ``head_dim`` to
    queries and keys before RoPE.
    """

    arch: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise SoljaxError(f"unsupported architecture {self.arch!r} (supported: {', '.join(ARCHS)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SoljaxError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise SoljaxError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise SoljaxError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise SoljaxError(f"model config: rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise SoljaxError(f"model config: rope_theta must be positive, got {self.rope_theta}")
        if self.dtype not in DTYPES:
            raise SoljaxError(f"model config: dtype must be one of {DTYPES}, got {self.dtype!r}")

    def check_length(self, n: int, what: str) -> None:
        """Raises :class:`SoljaxError` unless a sequence of ``n`` tokens fits the model's context."""
        if n > self.max_position_embeddings:
            raise SoljaxError(f"{what} ({n} tokens) exceeds the model's maximum context "
                              f"(max_position_embeddings = {self.max_position_embeddings})")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "LMConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SoljaxError(f"model config: unknown keys {unknown}")
        try:
            if isinstance(d.get("rope_scaling"), dict):
                d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
            if "eos_token_ids" in d:
                d["eos_token_ids"] = tuple(d["eos_token_ids"])
            return cls(**d)
        except TypeError as e:
            raise SoljaxError(f"model config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LMConfig":
        """Builds the config from a Hugging Face ``config.json`` dictionary."""
        model_type = hf.get("model_type", "")
        archs = {"llama": "llama", "mistral": "llama", "smollm2": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
        if model_type not in archs:
            raise SoljaxError(
                f"unsupported architecture {model_type!r} in config.json (supported model_type: "
                f"{', '.join(sorted(archs))})"
            )
        arch = archs[model_type]
        if hf.get("hidden_act", "silu") != "silu":
            raise SoljaxError(f"unsupported hidden_act {hf.get('hidden_act')!r} (only silu)")
        if hf.get("mlp_bias"):
            raise SoljaxError("unsupported config: mlp_bias=true")
        if hf.get("use_sliding_window"):
            raise SoljaxError("unsupported config: use_sliding_window=true")
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden // num_heads
            eos = hf.get("eos_token_id")
            eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
            qkv_bias = {"llama": bool(hf.get("attention_bias", False)), "qwen2": True,
                        "qwen3": bool(hf.get("attention_bias", False))}[arch]
            return cls(
                arch=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(hf)),
                rope_scaling=_rope_scaling(hf.get("rope_scaling") or hf.get("rope_parameters")),
                max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=arch == "llama" and bool(hf.get("attention_bias", False)),
                qk_norm=arch == "qwen3",
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos,
            )
        except KeyError as e:
            raise SoljaxError(f"config.json is missing the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise SoljaxError(f"config.json has a bad value: {e}") from None


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return hf.get("rope_theta", 10000.0)


def _rope_scaling(rs: dict[str, Any] | None) -> RopeScaling:
    if not rs:
        return RopeScaling()
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(rs["factor"]))
    if kind == "llama3":
        return RopeScaling(
            rope_type="llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    raise SoljaxError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
