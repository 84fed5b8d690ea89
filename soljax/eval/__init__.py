"""Evaluation: perplexity sweeps of a policy against budget-matched baselines, their report, the
paper's perplexity protocol, fixed schedules scored on given blocks, dense perplexity, and
downstream tasks through lm_eval."""

from soljax.eval.protocol import PaperConfig, eval_paper
from soljax.eval.sweep import Sweep, SweepConfig, eval_ppl

__all__ = ["PaperConfig", "Sweep", "SweepConfig", "eval_paper", "eval_ppl"]
