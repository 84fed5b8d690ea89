"""Named model shapes for the benchmarks that run random weights: Hugging Face ``config.json``
fields of real models (and one tiny shape for smoke tests and dry runs of device scripts)."""

from __future__ import annotations

from soljax.errors import SoljaxError
from soljax.lm.config import LMConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

#: shape name -> the ``config.json`` fields that set its shapes (plus its RoPE and positions).
SHAPES = {
    "llama-tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                       max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072),
}

#: fields every shape shares unless it sets its own.
LLAMA_DEFAULTS = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
                  "rope_theta": 500000.0, "max_position_embeddings": 8192}


def hf_config(shape: str) -> dict:
    """The full ``config.json`` dictionary of a named shape."""
    if shape not in SHAPES:
        raise SoljaxError(f"unknown model shape {shape!r} (expected one of {', '.join(SHAPES)})")
    return {**LLAMA_DEFAULTS, **SHAPES[shape]}


def shape_config(shape: str, dtype: str = "float32") -> LMConfig:
    """The :class:`LMConfig` of a named shape, in ``dtype``."""
    import dataclasses

    return dataclasses.replace(LMConfig.from_hf(hf_config(shape)), dtype=dtype)
