"""Where tokens come from: the offline assets (embedded model, novels, MMLU), the embedded default
model, and text corpora cut into training and evaluation blocks."""

from soljax.data.blocks import SPLITS, iter_texts, load_blocks, load_token_ids, make_blocks, read_texts
from soljax.data.embedded import embedded_model_dir, ensure_embedded_model

__all__ = ["SPLITS", "embedded_model_dir", "ensure_embedded_model", "iter_texts", "load_blocks", "load_token_ids",
           "make_blocks", "read_texts"]
