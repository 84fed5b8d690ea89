"""soljax: Self-Optimizing Language Models in JAX.

A frozen Llama-family LM (pure functions over a parameter pytree) plus, in later modules, a small
policy that chooses per-token compute. The most used entry points are re-exported here.
"""

from soljax.errors import SoljaxError
from soljax.lm import KVCache, LMConfig, decode_step, extend, forward, logits, prefill
from soljax.lm.checkpoint import load_model
from soljax.lm.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "KVCache", "LMConfig", "SoljaxError", "Tokenizer", "decode_step", "extend", "forward",
    "load_model", "logits", "prefill",
]
