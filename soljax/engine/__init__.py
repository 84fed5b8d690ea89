"""The engine: controlled decoding of a frozen LM, one step at a time.

* :mod:`~soljax.engine.observe`: the :class:`Observation` a controller sees, the :class:`Controller`
  protocol, usage accounting;
* :mod:`~soljax.engine.step`: THE controlled step (observe, act, LM step under the controls, usage);
* :mod:`~soljax.engine.rollout`: teacher-forced rollouts of K schedules per block (training,
  evaluation, schedule experiments);
* :mod:`~soljax.engine.episodes`: serving, in episodes with dense replay (generation, scoring).
"""

from soljax.engine.episodes import ControlledModel, DecodeState, EpisodeOut, run_episode, start
from soljax.engine.observe import (Controller, Observation, applied_usage, episode_usage, steps_left,
                                   usage_per_step)
from soljax.engine.rollout import Prefilled, Trajectory, prefill_blocks, rollout
from soljax.engine.step import StepCarry, StepOut, controlled_decode

__all__ = [
    "ControlledModel", "Controller", "DecodeState", "EpisodeOut", "Observation", "Prefilled", "StepCarry",
    "StepOut", "Trajectory", "applied_usage", "controlled_decode", "episode_usage", "prefill_blocks",
    "rollout", "run_episode", "start", "steps_left", "usage_per_step",
]
