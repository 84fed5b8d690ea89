"""Serving: dense and controlled generation, and scoring continuations under controlled decoding."""

from soljax.serve.generate import (controlled_generate, dense_logprobs, generate, policy_generation_report,
                                   score_continuations)

__all__ = ["controlled_generate", "dense_logprobs", "generate", "policy_generation_report", "score_continuations"]
