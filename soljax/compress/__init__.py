"""Simulated compression controlled per row: the action grid, QUEST/recency/relevancy token
sparsity, MLP-input magnitude pruning and MLP-output fake quantization.

Every function is pure and jit-compatible and takes its controls (``kappa``, ``rho``, ``bits``) as
per-row arrays, so one compiled program serves any mix of actions in a batch.
"""

from soljax.compress.actions import AXES, ActionGrid
from soljax.compress.attention import (
    attended_fraction,
    merge_page_summaries,
    page_summaries,
    quest_fallback,
    quest_keep,
    quest_keep_shared,
    quest_keep_split,
    quest_page_budget,
    quest_scores,
    quest_select,
    quest_token_budget,
    recency_keep,
    recency_keep_at,
    refresh_page_summaries,
    relevancy_keep,
    relevancy_keep_logits,
    select_pages,
    token_keep_from_pages,
    window_page_summaries,
    window_pages,
)
from soljax.compress.prune import prune_counts, prune_mask, prune_topk
from soljax.compress.quant import fake_quant, quant_step

__all__ = [
    "AXES", "ActionGrid", "attended_fraction", "fake_quant", "merge_page_summaries",
    "page_summaries", "prune_counts", "prune_mask", "prune_topk", "quant_step", "quest_fallback",
    "quest_keep", "quest_keep_shared", "quest_keep_split", "quest_page_budget", "quest_scores", "quest_select",
    "quest_token_budget", "recency_keep", "recency_keep_at", "refresh_page_summaries", "relevancy_keep",
    "relevancy_keep_logits", "select_pages",
    "token_keep_from_pages", "window_page_summaries", "window_pages",
]
