"""The frozen language model: config, parameters, forward/prefill/decode, conversion, checkpoints."""

from soljax.lm.config import LMConfig, RopeScaling
from soljax.lm.model import KVCache, decode_step, embed, extend, forward, logits, prefill
from soljax.lm.params import abstract_params, count_params, init_params

__all__ = [
    "KVCache", "LMConfig", "RopeScaling", "abstract_params", "count_params", "decode_step", "embed",
    "extend", "forward", "init_params", "logits", "prefill",
]
