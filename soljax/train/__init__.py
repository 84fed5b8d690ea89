"""GRPO training of the SOL policy: the trainer, its state, the objective and the run writer."""

from soljax.train.objective import GRPOConfig, compute_advantages, ppo_loss
from soljax.train.state import Buffer, TrainState
from soljax.train.trainer import Trainer, train
from soljax.train.writer import RunWriter

__all__ = ["Buffer", "GRPOConfig", "RunWriter", "TrainState", "Trainer", "compute_advantages", "ppo_loss", "train"]
