"""Critic-free GRPO for compute schedules: rewards, returns, budget penalty, advantages, PPO loss.

Training rolls out K schedules per text block over the same T ground-truth tokens, so every array
here is ``[B, K, T]`` (B blocks, K schedules per block = one GRPO group, T steps). The pipeline
(:func:`compute_advantages` with the default ``"grpo"`` estimator) is::

    r_t = (1 - w) * log p(y_t) - w * KL(p_dense,t || p_t)          rewards()
    G_t = r_t + gamma * G_{t+1}   (reward_agg "sum")                  returns()
    Pen = sum_axis alpha * max(|u_axis - C_axis| - deadzone, 0)^2    budget_penalty()   [B, K]
    R_t = G_t - Pen               ("outcome" level with "sum"/"max": G_0 broadcast to every t first)
    A   = R - mean_K(R) per (block, step)  ("zscore": / std_K)       advantages()
    A   = (A - mean(A)) / std(A) over all B*K*T entries of the batch (whitening)

Everything is a pure function of arrays and static Python settings, so it composes with ``jit``
(:class:`GRPOConfig` is hashable and may be a static argument). Standard deviations are population
standard deviations clamped from below at ``std_floor``.

The policy loss follows "losses as (sum, denominator)": :func:`ppo_loss` returns the summed
per-entry surrogate and the number of entries it covers, so adding both over micro-batches and
dividing once gives exactly the minibatch mean.

Advantage estimators are registered by name (:func:`register_estimator`); ``GRPOConfig.estimator``
selects one. ``"grpo"`` is the pipeline above; ``"reinforce"`` replaces the group baseline by the
batch mean.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from soljax.compress.actions import AXES, ActionGrid
from soljax.errors import SoljaxError

__all__ = [
    "ESTIMATORS", "GRPOConfig", "advantages", "budget_penalty", "compute_advantages",
    "get_estimator", "group_normalize", "penalized_returns",
    "penalty_alphas", "ppo_loss", "register_estimator", "returns", "rewards", "whiten",
]

REWARD_AGGS = ("sum", "max", None)
LEVELS = ("process", "outcome")
NORMS = ("center", "zscore")

Estimator = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

#: Advantage estimators by name: ``fn(cfg, logp_true, kl, usage, targets, alphas) -> (adv, diag)``.
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator registering an advantage estimator under ``name``; it is called like
    :func:`compute_advantages`: ``fn(cfg, logp_true, kl, usage, targets, alphas) -> (adv, diag)``.
    Registering an existing name replaces it."""
    if not isinstance(name, str) or not name:
        raise SoljaxError(f"estimator name must be a non-empty string, got {name!r}")

    def deco(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return deco


def get_estimator(name: str) -> Estimator:
    """The estimator registered as ``name``; unknown names raise :class:`SoljaxError`."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(ESTIMATORS))
        raise SoljaxError(f"unknown advantage estimator {name!r} (known: {known})") from None


# ---------------------------------------------------------------------------------------- config


def _number(name: str, value, lo: float | None = None, hi: float | None = None,
            hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SoljaxError(f"GRPOConfig.{name} must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise SoljaxError(f"GRPOConfig.{name} must be >= {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        bound = f"< {hi}" if hi_open else f"<= {hi}"
        raise SoljaxError(f"GRPOConfig.{name} must be {bound}, got {value!r}")


def _choice(name: str, value, options: Sequence, owner: str = "") -> None:
    if not any(value is o or (isinstance(value, str) and value == o) for o in options):
        raise SoljaxError(f"{owner}{name} must be one of {list(options)}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Settings of the advantage pipeline and the PPO loss (defaults = the official SOL runs).

    ``reward_agg``: ``"sum"`` (discounted reward-to-go), ``"max"`` or ``None`` (per-step reward);
    ``gamma`` in [0, 1); ``level``: ``"process"`` (per-step group baseline) or ``"outcome"`` (one
    episode return per rollout); ``norm``: ``"center"`` or ``"zscore"`` within each group;
    ``std_floor`` > 0 clamps every standard deviation; ``whiten``: global whitening over the batch;
    ``alpha_*`` >= 0 budget-penalty weights (token, prune, quant) and ``deadzone`` >= 0 its
    tolerance; ``task_w_kl`` in [0, 1] mixes the dense-KL reward in; ``clip`` > 0 the PPO ratio
    clip; ``entropy_coef``/``kl_ref_coef`` >= 0 the entropy bonus and the KL-to-initial-policy
    weight; ``estimator`` a name in :data:`ESTIMATORS`.
    """

    reward_agg: str | None = "sum"
    gamma: float = 0.85
    level: str = "process"
    norm: str = "center"
    std_floor: float = 1e-6
    whiten: bool = True
    alpha_token: float = 100.0
    alpha_prune: float = 100.0
    alpha_quant: float = 200.0
    deadzone: float = 0.02
    task_w_kl: float = 0.0
    clip: float = 0.2
    entropy_coef: float = 0.05
    kl_ref_coef: float = 0.0
    estimator: str = "grpo"

    def __post_init__(self):
        _choice("reward_agg", self.reward_agg, REWARD_AGGS, "GRPOConfig.")
        _number("gamma", self.gamma, 0.0, 1.0, hi_open=True)
        _choice("level", self.level, LEVELS, "GRPOConfig.")
        _choice("norm", self.norm, NORMS, "GRPOConfig.")
        _number("std_floor", self.std_floor)
        if self.std_floor <= 0:
            raise SoljaxError(f"GRPOConfig.std_floor must be > 0, got {self.std_floor!r}")
        if not isinstance(self.whiten, bool):
            raise SoljaxError(f"GRPOConfig.whiten must be true or false, got {self.whiten!r}")
        for name in ("alpha_token", "alpha_prune", "alpha_quant", "deadzone", "entropy_coef",
                     "kl_ref_coef"):
            _number(name, getattr(self, name), 0.0)
        _number("task_w_kl", self.task_w_kl, 0.0, 1.0)
        _number("clip", self.clip)
        if self.clip <= 0:
            raise SoljaxError(f"GRPOConfig.clip must be > 0, got {self.clip!r}")
        if not isinstance(self.estimator, str) or self.estimator not in ESTIMATORS:
            known = ", ".join(sorted(ESTIMATORS))
            raise SoljaxError(f"GRPOConfig.estimator {self.estimator!r} is not registered "
                              f"(known: {known})")

    def penalty_alphas(self, grid: ActionGrid | None = None) -> tuple[float, float, float]:
        """``(alpha_token, alpha_prune, alpha_quant)``, zeroed for single-choice axes of ``grid``."""
        alphas = (float(self.alpha_token), float(self.alpha_prune), float(self.alpha_quant))
        return alphas if grid is None else penalty_alphas(grid, alphas)


def penalty_alphas(grid: ActionGrid, alphas: Sequence[float]) -> tuple[float, float, float]:
    """Penalty weights (token, prune, quant) with those of the grid's single-choice axes set to 0
    (an axis the policy cannot move must not be penalized)."""
    if len(alphas) != 3:
        raise SoljaxError(f"alphas must be (token, prune, quant), got {alphas!r}")
    return grid.penalty_weights(*alphas)


# ---------------------------------------------------------------------------------------- pieces


def rewards(logp_true: jax.Array, kl_dense: jax.Array | None = None, w: float = 0.0) -> jax.Array:
    """Per-step reward ``(1 - w) * logp_true - w * kl_dense`` (``[B, K, T]``).

    ``kl_dense`` is ``KL(p_dense || p_compressed)`` per step (see :func:`soljax.distributions.kl_categorical`); it is
    not read when ``w`` is 0 and may then be ``None``.
    """
    logp_true = jnp.asarray(logp_true, jnp.float32)
    if isinstance(w, (int, float)) and w == 0:
        return logp_true  # the KL term is unused (and may be absent)
    if kl_dense is None:
        raise SoljaxError(f"task_w_kl = {w!r} needs the dense-KL per step, but kl_dense is None")
    return (1.0 - w) * logp_true - w * jnp.asarray(kl_dense, jnp.float32)


@functools.partial(jax.jit, static_argnames=("agg",))
def returns(r: jax.Array, gamma: float, agg: str | None = "sum",
            valid: jax.Array | None = None) -> jax.Array:
    """Returns over the last axis of ``r`` (``[..., T]``).

    ``"sum"``: reward-to-go ``G_t = r_t + gamma * G_{t+1}`` with ``G_T = 0``. ``"max"``:
    ``G_t = max(r_t, gamma * G_{t+1})`` starting from ``G_{T-1} = r_{T-1}`` (the best discounted
    reward still ahead; starting from 0 instead would make every return 0 for log-probability
    rewards, which are negative). ``None``: ``G_t = r_t``.

    ``valid`` (same shape, bool) drops steps: an invalid step adds nothing, is not discounted over,
    and gets return 0 (e.g. padding after a short episode). All steps are valid in training.
    """
    _choice("reward_agg", agg, REWARD_AGGS)
    r = jnp.asarray(r, jnp.float32)
    v = jnp.ones(r.shape, bool) if valid is None else jnp.broadcast_to(jnp.asarray(valid, bool), r.shape)
    if agg is None:
        return jnp.where(v, r, 0.0)
    gamma = jnp.float32(gamma)

    def step(carry, x):
        g_next, has_next = carry
        r_t, v_t = x
        if agg == "sum":
            g = r_t + gamma * g_next
        else:
            g = jnp.where(has_next, jnp.maximum(r_t, gamma * g_next), r_t)
        new = (jnp.where(v_t, g, g_next), has_next | v_t)
        return new, jnp.where(v_t, g, 0.0)

    xs = (jnp.moveaxis(r, -1, 0), jnp.moveaxis(v, -1, 0))
    init = (jnp.zeros(r.shape[:-1], jnp.float32), jnp.zeros(r.shape[:-1], bool))
    _, g = jax.lax.scan(step, init, xs, reverse=True)
    return jnp.moveaxis(g, 0, -1)


def budget_penalty(usage: Mapping[str, jax.Array], targets: jax.Array, alphas: Sequence[float] | jax.Array,
                   deadzone: float = 0.02) -> jax.Array:
    """Squared-hinge budget penalty per rollout, ``[B, K]``.

    ``usage``: ``{"token", "prune", "quant"} -> [B, K]`` episode-mean nominal usage over effective
    steps; ``targets``: ``[B, 3]`` (shared by a block's K rollouts) or ``[B, K, 3]`` in axis order
    (token keep, prune keep, quant ratio); ``alphas``: ``(3,)`` weights (zero them for single-choice
    axes with :func:`penalty_alphas`). ``Pen = sum_axis alpha * max(|u - C| - deadzone, 0)^2``:
    spending under the target is penalized like spending over it.
    """
    missing = [a for a in AXES if a not in usage]
    if missing:
        raise SoljaxError(f"usage is missing axes {missing} (expected keys {list(AXES)})")
    u = jnp.stack([jnp.asarray(usage[a], jnp.float32) for a in AXES], axis=-1)  # [B, K, 3]
    c = jnp.asarray(targets, jnp.float32)
    if c.ndim == u.ndim - 1:
        c = c[:, None, :]  # [B, 1, 3]: one target per block
    alphas = jnp.asarray(alphas, jnp.float32)
    hinge = jnp.maximum(jnp.abs(u - c) - jnp.float32(deadzone), 0.0)
    return jnp.sum(alphas * hinge * hinge, axis=-1)


def penalized_returns(g: jax.Array, pen: jax.Array, level: str = "process", agg: str | None = "sum") -> jax.Array:
    """``R_t = G_t - Pen`` (``[B, K, T]`` minus ``[B, K]``).

    For ``level="outcome"`` with an aggregating ``agg`` (``"sum"`` or ``"max"``), ``G_0`` (the
    whole episode's return) is broadcast to every step first; with ``agg=None`` the returns are the
    per-step rewards and are kept per step (the outcome advantage then sums them over t).
    """
    _choice("level", level, LEVELS)
    _choice("reward_agg", agg, REWARD_AGGS)
    g = jnp.asarray(g, jnp.float32)
    if level == "outcome" and agg is not None:
        g = jnp.broadcast_to(g[..., :1], g.shape)
    return g - jnp.asarray(pen, jnp.float32)[..., None]


def _pop_std(x: jax.Array, axis, floor: float) -> jax.Array:
    return jnp.maximum(jnp.std(x, axis=axis, keepdims=True), jnp.float32(floor))


def group_normalize(x: jax.Array, norm: str = "center", std_floor: float = 1e-6,
                    axis: int = 1) -> jax.Array:
    """Centre ``x`` over ``axis`` (the K rollouts of a group); ``"zscore"`` also divides by the
    population std over that axis, clamped at ``std_floor``."""
    _choice("norm", norm, NORMS)
    out = x - jnp.mean(x, axis=axis, keepdims=True)
    if norm == "zscore":
        out = out / _pop_std(x, axis, std_floor)
    return out


def whiten(x: jax.Array, std_floor: float = 1e-6) -> jax.Array:
    """``(x - mean) / max(std, std_floor)`` over all entries (population std)."""
    x = jnp.asarray(x, jnp.float32)
    return (x - jnp.mean(x)) / _pop_std(x, None, std_floor)


@functools.partial(jax.jit, static_argnames=("level", "norm", "whiten_global"))
def advantages(R: jax.Array, level: str = "process", norm: str = "center", std_floor: float = 1e-6,
               whiten_global: bool = True) -> jax.Array:
    """Group-relative advantages ``[B, K, T]`` from penalized returns ``R`` ``[B, K, T]``.

    ``"process"``: normalize each (block, step) over its K rollouts. ``"outcome"``: sum R over t
    per rollout, normalize over the K rollouts, broadcast to every step. Then, if
    ``whiten_global``, whiten over all B*K*T entries of this batch.
    """
    _choice("level", level, LEVELS)
    R = jnp.asarray(R, jnp.float32)
    if level == "process":
        A = group_normalize(R, norm, std_floor, axis=1)
    else:
        total = jnp.sum(R, axis=-1)  # [B, K]
        A = jnp.broadcast_to(group_normalize(total, norm, std_floor, axis=1)[..., None], R.shape)
    return whiten(A, std_floor) if whiten_global else A


# ---------------------------------------------------------------------------------------- pipeline


def _prepare(cfg: GRPOConfig, logp_true, kl, usage, targets, alphas):
    """Rewards, returns, penalty and penalized returns shared by the estimators, plus diagnostics."""
    r = rewards(logp_true, kl, cfg.task_w_kl)
    g = returns(r, cfg.gamma, cfg.reward_agg)
    pen = budget_penalty(usage, targets, alphas, cfg.deadzone)
    R = penalized_returns(g, pen, cfg.level, cfg.reward_agg)
    c = jnp.asarray(targets, jnp.float32)
    if c.ndim == 2:
        c = c[:, None, :]
    diag = {"reward_mean": jnp.mean(r), "penalty_mean": jnp.mean(pen), "return_mean": jnp.mean(g),
            "penalized_return_mean": jnp.mean(R)}
    for i, a in enumerate(AXES):
        u = jnp.asarray(usage[a], jnp.float32)
        diag[f"usage_{a}"] = jnp.mean(u)
        diag[f"gap_{a}"] = jnp.mean(jnp.abs(u - c[..., i]))
    return R, diag


@register_estimator("grpo")
def _grpo(cfg: GRPOConfig, logp_true, kl, usage, targets, alphas):
    R, diag = _prepare(cfg, logp_true, kl, usage, targets, alphas)
    adv = advantages(R, cfg.level, cfg.norm, cfg.std_floor, cfg.whiten)
    return adv, diag


@register_estimator("reinforce")
def _reinforce(cfg: GRPOConfig, logp_true, kl, usage, targets, alphas):
    R, diag = _prepare(cfg, logp_true, kl, usage, targets, alphas)
    adv = R - jnp.mean(R)
    adv = whiten(adv, cfg.std_floor) if cfg.whiten else adv
    return adv, diag


def compute_advantages(cfg: GRPOConfig, logp_true: jax.Array, kl: jax.Array | None,
                       usage: Mapping[str, jax.Array], targets: jax.Array,
                       alphas: Sequence[float] | jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Advantages ``[B, K, T]`` and scalar diagnostics for one data batch, with ``cfg.estimator``.

    ``logp_true``: log p of the true token per step; ``kl``: ``KL(p_dense || p)`` per step or
    ``None`` (when ``cfg.task_w_kl`` is 0); ``usage``/``targets``/``alphas`` as in
    :func:`budget_penalty`. Diagnostics: ``reward_mean``, ``penalty_mean``, ``return_mean``
    (discounted, before the penalty), ``penalized_return_mean``, and per axis ``usage_<axis>``
    (mean usage) and ``gap_<axis>`` (mean ``|usage - target|``).
    """
    return get_estimator(cfg.estimator)(cfg, logp_true, kl, usage, targets, alphas)


# ---------------------------------------------------------------------------------------- loss


@jax.jit
def ppo_loss(logp_new: jax.Array, logp_old: jax.Array, adv: jax.Array, entropy: jax.Array,
             mask: jax.Array | None = None, clip: float = 0.2, entropy_coef: float = 0.05,
             kl_ref: jax.Array | None = None, kl_ref_coef: float = 0.0,
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Clipped PPO surrogate as ``(loss_sum, denom, aux)`` over ``[N, T]`` entries.

    Per entry: ``-min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) - entropy_coef * H
    (+ kl_ref_coef * kl_ref)`` with ``ratio = exp(logp_new - logp_old)``; ``loss_sum`` sums it over
    the entries where ``mask`` (bool or 0/1) is set (all when ``None``) and ``denom`` counts them, so
    ``loss_sum / denom`` is the minibatch mean, and sums over micro-batches divide exactly.
    ``logp_old`` and ``adv`` are treated as constants. ``aux`` (means over the masked entries):
    ``clip_frac`` (ratio outside ``[1 - clip, 1 + clip]``), ``ratio_mean``, ``approx_kl``
    (mean of ``logp_old - logp_new``), ``entropy``, ``kl_ref``, ``pg_loss`` (surrogate part only).
    """
    logp_new = jnp.asarray(logp_new, jnp.float32)
    logp_old = jax.lax.stop_gradient(jnp.asarray(logp_old, jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(adv, jnp.float32))
    entropy = jnp.asarray(entropy, jnp.float32)
    m = jnp.ones(logp_new.shape, jnp.float32) if mask is None else \
        jnp.broadcast_to(jnp.asarray(mask), logp_new.shape).astype(jnp.float32)

    log_ratio = logp_new - logp_old
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    per_entry = pg - entropy_coef * entropy
    kl = jnp.zeros_like(logp_new) if kl_ref is None else jnp.asarray(kl_ref, jnp.float32)
    if kl_ref is not None:
        per_entry = per_entry + kl_ref_coef * kl

    masked_sum = lambda x: jnp.sum(jnp.where(m > 0, x * m, 0.0))  # noqa: E731
    loss_sum = masked_sum(per_entry)
    denom = jnp.sum(m)
    n = jnp.maximum(denom, 1.0)
    outside = (ratio < 1.0 - clip) | (ratio > 1.0 + clip)
    aux = {"clip_frac": masked_sum(outside.astype(jnp.float32)) / n,
           "ratio_mean": jax.lax.stop_gradient(masked_sum(ratio) / n),
           "approx_kl": jax.lax.stop_gradient(masked_sum(-log_ratio) / n),
           "entropy": jax.lax.stop_gradient(masked_sum(entropy) / n),
           "kl_ref": jax.lax.stop_gradient(masked_sum(kl) / n),
           "pg_loss": jax.lax.stop_gradient(masked_sum(pg) / n)}
    return loss_sum, denom, aux
