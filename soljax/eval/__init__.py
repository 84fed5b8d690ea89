"""Evaluation: perplexity sweeps of a policy against budget-matched baselines, their report, fixed
schedules scored on given blocks, dense perplexity, and downstream tasks through lm_eval."""

from soljax.eval.sweep import Sweep, SweepConfig, eval_ppl

__all__ = ["Sweep", "SweepConfig", "eval_ppl"]
