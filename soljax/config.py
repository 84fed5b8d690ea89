"""Training configuration: a validated dataclass loaded from YAML with ``key=value`` overrides.

Keys follow the reference implementation's names where one exists, so its configs translate
line by line. ``configs/default.yaml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from soljax.compress.actions import AXES, ActionGrid
from soljax.control.network import PolicyConfig
from soljax.errors import SoljaxError
from soljax.kernels.ops import ATTENTION_IMPLS, MLP_IMPLS
from soljax.lm.config import LMConfig
from soljax.lm.controlled import SparsityConfig

# the infix of each axis's budget keys (budget_tok_min, budget_q_ratio_list...), the reference's names
BUDGET_KEYS = {"token": "tok", "prune": "prune", "quant": "q_ratio"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # model and data
    model: str = "embedded"
    data: str = "train"
    max_blocks: int | None = None
    data_max_docs: int | None = 1_000_000  # rows read from an hf: source (the reference's Dolma cap)
    train_fraction: float = 1.0
    max_batches: int | None = None
    dtype: str = "float32"
    # episode shape
    context_len: int = 256
    rollout_len: int = 16
    batch_size: int = 2
    grpo_rollouts_per_input: int = 8
    # action grid and sparsity
    keep_fracs: tuple[float, ...] = (0.1, 1.0)
    struct_prune_choices: tuple[str, ...] = ("s60", "s100")
    quant_choices: tuple[str, ...] = ("q5", "q16")
    sparsity_criteria: str = "quest"
    quest_page_size: int = 8
    relevancy_tier: str = "per_head"
    attention_impl: str = "xla"
    mlp_impl: str = "xla"
    kernel_interpret: bool = False
    Ts: int = 4
    Tw: int = 2
    rollout_engine: str = "shared"
    # budget targets, per axis: a list to choose from, else U(min, max), else the constant
    budget_tok_list: tuple[float, ...] | None = None
    budget_tok_min: float | None = 0.1
    budget_tok_max: float | None = 1.0
    budget_prune_list: tuple[float, ...] | None = None
    budget_prune_min: float | None = 0.6
    budget_prune_max: float | None = 1.0
    budget_q_ratio_list: tuple[float, ...] | None = None
    budget_q_ratio_min: float | None = 0.3125
    budget_q_ratio_max: float | None = 1.0
    C_target: float = 0.5
    C_target_prune: float = 0.6
    C_target_quant_bits: float = 7.0
    # reward, penalty, advantages
    alpha_tok: float = 100.0
    alpha_prune: float = 100.0
    alpha_quant: float = 200.0
    budget_deadzone: float = 0.02
    reward_agg: str | None = "sum"
    reward_gamma: float = 0.85
    grpo_level: str = "process"
    grpo_norm: str = "center"
    adv_whiten_global: bool = True
    task_w_kl: float = 0.0
    estimator: str = "grpo"
    # policy objective and optimizer
    pi_temperature: float = 1.3
    entropy_coef: float = 0.05
    ppo_clip: float = 0.2
    kl_pi_ref_coef: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    warmup_updates: int = 0
    max_grad_norm: float = 2.0
    grad_accum_steps: int = 8
    ppo_minibatch_size: int = 512
    ppo_target_batch_size: int = 2048
    # policy network
    policy_d_model: int = 512
    policy_n_heads: int = 4
    policy_n_layers: int = 1
    policy_mlp_ratio: float = 4.0
    policy_action_dim: int = 32
    policy_max_len: int = 1024
    # run
    seed: int = 1234
    out_dir: str = "runs/sol"
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    # scale-out (soljax.parallel, docs/scaleout.md)
    mesh_data: int = 0
    mesh_model: int = 0
    shard_policy: str = "replicated"
    distributed: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        for name in ("context_len", "rollout_len", "batch_size", "grpo_rollouts_per_input", "quest_page_size",
                     "grad_accum_steps", "ppo_minibatch_size", "ppo_target_batch_size", "policy_d_model",
                     "policy_n_heads", "policy_n_layers", "policy_action_dim", "policy_max_len",
                     "checkpoint_every", "keep_checkpoints"):
            _positive_int(name, getattr(self, name))
        for name in ("Ts", "Tw", "warmup_updates", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SoljaxError(f"config: {name} must be a non-negative integer, got {v!r}")
        for name in ("max_blocks", "max_batches"):
            v = getattr(self, name)
            if v is not None:
                _positive_int(name, v)
        if self.data_max_docs is not None:
            _positive_int("data_max_docs", self.data_max_docs)
        if not 0 < self.train_fraction <= 1:
            raise SoljaxError(f"config: train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.grpo_rollouts_per_input < 2:
            raise SoljaxError("config: grpo_rollouts_per_input must be at least 2 (a group needs K >= 2)")
        if self.rollout_len > self.policy_max_len:
            raise SoljaxError(f"config: rollout_len ({self.rollout_len}) exceeds policy_max_len ({self.policy_max_len})")
        for name in ("lr", "max_grad_norm", "pi_temperature"):
            if not getattr(self, name) > 0:
                raise SoljaxError(f"config: {name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "entropy_coef", "kl_pi_ref_coef"):
            if not getattr(self, name) >= 0:
                raise SoljaxError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise SoljaxError(f"config: lr_schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        for name, impls in (("attention_impl", ATTENTION_IMPLS), ("mlp_impl", MLP_IMPLS)):
            if getattr(self, name) not in impls:
                raise SoljaxError(f"config: {name} must be one of {', '.join(impls)}, got {getattr(self, name)!r}")
        if self.attention_impl != "xla" and self.sparsity_criteria != "quest":
            raise SoljaxError(f"config: attention_impl {self.attention_impl} needs sparsity_criteria quest")
        if not isinstance(self.kernel_interpret, bool):
            raise SoljaxError(f"config: kernel_interpret must be true or false, got {self.kernel_interpret!r}")
        if self.rollout_engine not in ("shared", "copied"):
            raise SoljaxError(f"config: rollout_engine must be shared or copied, got {self.rollout_engine!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise SoljaxError(f"config: dtype must be float32 or bfloat16, got {self.dtype!r}")
        for axis in AXES:
            self.budget_sampler(axis)  # validates lists and ranges
        self._check_scaleout()

    def _check_scaleout(self) -> None:
        for name in ("mesh_data", "mesh_model"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SoljaxError(f"config: {name} must be a non-negative integer (0 = infer), got {v!r}")
        if self.mesh_data and self.batch_size % self.mesh_data:
            raise SoljaxError(f"config: batch_size ({self.batch_size}) must be a multiple of mesh_data "
                              f"({self.mesh_data}): the blocks of a batch are split over the data axis")
        if self.shard_policy not in ("replicated", "fsdp"):
            raise SoljaxError(f"config: shard_policy must be replicated or fsdp, got {self.shard_policy!r}")
        if self.distributed not in ("auto", "on", "off"):
            raise SoljaxError(f"config: distributed must be auto, on or off, got {self.distributed!r}")
        if self.coordinator_address is not None and (not isinstance(self.coordinator_address, str)
                                                     or ":" not in self.coordinator_address):
            raise SoljaxError(f"config: coordinator_address must be HOST:PORT, got {self.coordinator_address!r}")
        if self.num_processes is not None:
            _positive_int("num_processes", self.num_processes)
        if self.process_id is not None:
            v = self.process_id
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SoljaxError(f"config: process_id must be a non-negative integer, got {v!r}")
            if self.num_processes is not None and v >= self.num_processes:
                raise SoljaxError(f"config: process_id {v} is out of range for num_processes {self.num_processes}")

    # ------------------------------------------------------------------ budgets

    def default_target(self, axis: str) -> float:
        return {"token": self.C_target, "prune": self.C_target_prune, "quant": self.C_target_quant_bits / 16.0}[axis]

    def budget_sampler(self, axis: str) -> tuple[str, tuple[float, ...]]:
        """``("list", values)``, ``("uniform", (lo, hi))`` or ``("constant", (c,))`` for an axis
        (one of :data:`~soljax.compress.actions.AXES`)."""
        key = BUDGET_KEYS[axis]
        values = getattr(self, f"budget_{key}_list")
        lo, hi = getattr(self, f"budget_{key}_min"), getattr(self, f"budget_{key}_max")
        if values is not None:
            if not values or not all(0 < float(v) <= 1 for v in values):
                raise SoljaxError(f"config: budget_{key}_list must be a non-empty list of values in (0, 1]")
            return "list", tuple(float(v) for v in values)
        if lo is not None or hi is not None:
            if lo is None or hi is None:
                raise SoljaxError(f"config: budget_{key}_min and budget_{key}_max must be given together")
            if not 0 < lo <= hi <= 1:
                raise SoljaxError(f"config: bad budget range for {axis}: need 0 < min <= max <= 1, got [{lo}, {hi}]")
            return "uniform", (float(lo), float(hi))
        c = self.default_target(axis)
        if not 0 < c <= 1:
            raise SoljaxError(f"config: the default {axis} target must be in (0, 1], got {c}")
        return "constant", (c,)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """Reads a YAML file (or the defaults when ``path`` is None) and applies ``key=value`` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise SoljaxError(f"config file not found: {path}")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except UnicodeDecodeError:
                raise SoljaxError(f"{path} is not UTF-8 text") from None
            except yaml.YAMLError as e:
                raise SoljaxError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
            if not isinstance(loaded, dict):
                raise SoljaxError(f"{path} must hold a mapping of config keys")
            data.update(loaded)
        for item in overrides:
            if "=" not in item:
                raise SoljaxError(f"override {item!r} is not key=value")
            key, value = item.split("=", 1)
            try:
                data[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise SoljaxError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(e)}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SoljaxError(f"config: unknown keys {unknown}")
        clean = {k: _coerce(k, str(fields[k].type), v) for k, v in data.items()}
        try:
            return cls(**clean)
        except TypeError as e:
            raise SoljaxError(f"config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _coerce(name: str, kind: str, v):
    """YAML gives ``1e-4`` as a string and ``1`` as an int: coerce to the field's declared type."""
    if isinstance(v, list):
        v = tuple(v)
    try:
        if kind.startswith("tuple[float") and isinstance(v, tuple):
            return tuple(float(x) for x in v)
        if kind.startswith("float") and isinstance(v, (int, str)) and not isinstance(v, bool):
            return float(v)
    except ValueError:
        raise SoljaxError(f"config: {name} must be a number, got {v!r}") from None
    return v


def _yaml_problem(e: Exception) -> str:
    """A YAML error in one line: its problem and where, else the first line of its message."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise SoljaxError(f"config: {name} must be a positive integer, got {v!r}")


def updates_per_batch(cfg: TrainConfig) -> float:
    """Optimizer updates per data batch under the buffering/minibatching arithmetic."""
    entries = cfg.rollout_len * cfg.batch_size * cfg.grpo_rollouts_per_input
    per_buffer = math.ceil(cfg.ppo_target_batch_size / entries)
    seqs = per_buffer * cfg.batch_size * cfg.grpo_rollouts_per_input
    minibatches = math.ceil(seqs / max(1, cfg.ppo_minibatch_size // cfg.rollout_len))
    return minibatches / cfg.grad_accum_steps / per_buffer


# ---------------------------------------------------------------------------------------------- builders


def action_grid(cfg: TrainConfig) -> ActionGrid:
    """The run's action grid (keep fractions x prune choices x quant choices)."""
    return ActionGrid(keep_fracs=cfg.keep_fracs, struct_prune_choices=cfg.struct_prune_choices,
                      quant_choices=cfg.quant_choices)


def sparsity_config(cfg: TrainConfig) -> SparsityConfig:
    """How the controlled LM step applies token sparsity and which kernels it uses."""
    return SparsityConfig(criterion=cfg.sparsity_criteria, page_size=cfg.quest_page_size, sink_tokens=cfg.Ts,
                          window_tokens=cfg.Tw, relevancy_tier=cfg.relevancy_tier,
                          attention_impl=cfg.attention_impl, mlp_impl=cfg.mlp_impl,
                          kernel_interpret=cfg.kernel_interpret)


def policy_config(cfg: TrainConfig) -> PolicyConfig:
    """The policy network's shape and temperature."""
    return PolicyConfig(d_model=cfg.policy_d_model, n_heads=cfg.policy_n_heads, n_layers=cfg.policy_n_layers,
                        mlp_ratio=cfg.policy_mlp_ratio, action_dim=cfg.policy_action_dim,
                        max_len=cfg.policy_max_len, temperature=cfg.pi_temperature)


def check_episode_length(cfg: TrainConfig, lm_cfg: LMConfig) -> None:
    """Raises :class:`SoljaxError` unless a block (``context_len + rollout_len + 1`` tokens) fits
    the LM's context."""
    lm_cfg.check_length(cfg.context_len + cfg.rollout_len + 1, "config: context_len + rollout_len + 1")
