"""Pallas kernels for soljax, each beside a pure-JAX reference with the same signature.

:mod:`~soljax.kernels.ops` chooses the implementation (``impl: xla | pallas``); the references
(:mod:`~soljax.kernels.quest_attention`, :mod:`~soljax.kernels.sparse_mlp`) are the ``xla`` path,
the ``*_gpu`` (Triton) and ``*_tpu`` (Mosaic) modules the kernels.
"""

from soljax.kernels.ops import IMPLS, check_impl, down_fake_quant, quest_decode_attention, sparse_gate_up
from soljax.kernels.quest_attention import pages_from_keep
from soljax.kernels.sparse_mlp import union_channels

__all__ = ["IMPLS", "check_impl", "down_fake_quant", "pages_from_keep", "quest_decode_attention", "sparse_gate_up",
           "union_channels"]
