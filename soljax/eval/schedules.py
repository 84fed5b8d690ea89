"""``soljax score-schedules``: log-likelihood of fixed compute schedules on given token blocks.

The input (a dict, usually read from JSON)::

    {"blocks": [[token ids: M context tokens, then T + 1 more], ...],
     "criterion": "quest", "page_size": 8, "Ts": 4, "Tw": 2,          (all optional)
     "schedules": [{"name": "...", "kappa": [T floats], "rho": [T floats], "bits": [T ints]}, ...]}

Every schedule runs on every block, teacher-forced: step t feeds context token M + t and scores
token M + t + 1. All schedules of a block run in one compiled call over the block's shared prefix
(blocks of equal length share the call too).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soljax.control import GivenControls
from soljax.engine import episode_usage, rollout
from soljax.errors import SoljaxError
from soljax.lm.config import LMConfig
from soljax.lm.controlled import Controls, SparsityConfig


class ScheduleScores(NamedTuple):
    """Per ``[B, K, T]``: log p of the true token, realized attended fraction, effective flag,
    nominal usage ``[B, K, T, 3]``; ``hidden [B, K, T, D]``: final-norm hidden state after each
    step; ``kept_keys [B, K, T, L, Hq]``: keys attended per layer and query head."""

    logprobs: jax.Array
    attended: jax.Array
    effective: jax.Array
    usage: jax.Array
    hidden: jax.Array
    kept_keys: jax.Array


def run_schedules(cfg: LMConfig, scfg: SparsityConfig, params: dict, blocks: jax.Array, kappa: jax.Array,
                  rho: jax.Array, bits: jax.Array, context_len: int) -> ScheduleScores:
    """Scores K fixed compute schedules on every block (the ``given_controls`` controller).

    ``blocks [B, M + T + 1]``; ``kappa``/``rho``/``bits`` ``[B, K, T]`` or ``[K, T]`` (shared by
    all blocks); ``context_len = M``.
    """
    B = blocks.shape[0]
    kappa, rho, bits = (jnp.broadcast_to(jnp.asarray(a), (B,) + jnp.shape(a)[-2:]) for a in (kappa, rho, bits))
    controls = Controls(kappa.astype(jnp.float32), rho.astype(jnp.float32), bits.astype(jnp.int32))
    K = kappa.shape[1]
    traj = rollout(cfg, scfg, params, blocks, jnp.ones((B, 3)), GivenControls(), controls,
                   jax.random.PRNGKey(0), context_len=context_len, schedules=K, record_kept=True,
                   feed_effective=True)
    hidden = jnp.concatenate([traj.h_prev[:, :, 1:], traj.h_last[:, :, None]], axis=2)
    return ScheduleScores(logprobs=traj.logp_true, attended=traj.attended, effective=traj.effective,
                          usage=traj.usage, hidden=hidden, kept_keys=traj.kept_keys)


def _schedules(spec: dict) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    scheds = spec.get("schedules")
    if not isinstance(scheds, list) or not scheds:
        raise SoljaxError("input needs a non-empty list 'schedules'")
    names, rows = [], {"kappa": [], "rho": [], "bits": []}
    for i, s in enumerate(scheds):
        if not isinstance(s, dict):
            raise SoljaxError(f"schedule {i} must be an object with name, kappa, rho, bits")
        names.append(str(s.get("name", f"schedule_{i}")))
        for key in rows:
            v = s.get(key)
            if not isinstance(v, list) or not v:
                raise SoljaxError(f"schedule {names[-1]!r}: '{key}' must be a non-empty list")
            bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, float))]
            if bad:
                raise SoljaxError(f"schedule {names[-1]!r}: '{key}' must be a flat list of numbers, got {bad[0]!r}")
            rows[key].append(v)
    lengths = {len(v) for key in rows for v in rows[key]}
    if len(lengths) != 1:
        raise SoljaxError(f"every schedule's kappa, rho and bits need the same length T, got {sorted(lengths)}")
    try:
        kappa = np.asarray(rows["kappa"], np.float32)
        rho = np.asarray(rows["rho"], np.float32)
        bits_f = np.asarray(rows["bits"], np.float64)
    except (TypeError, ValueError, OverflowError):
        raise SoljaxError("schedule values must be numbers") from None
    if not ((kappa > 0) & (kappa <= 1)).all():
        raise SoljaxError("schedule kappa values must lie in (0, 1]")
    if not ((rho > 0) & (rho <= 1)).all():
        raise SoljaxError("schedule rho values must lie in (0, 1]")
    if not ((bits_f == np.round(bits_f)) & (bits_f >= 2) & (bits_f <= 16)).all():
        raise SoljaxError("schedule bits must be integers in [2, 16]")
    return names, kappa, rho, bits_f.astype(np.int32)


def _sparsity(spec: dict) -> SparsityConfig:
    try:
        return SparsityConfig(criterion=spec.get("criterion", "quest"), page_size=spec.get("page_size", 8),
                              sink_tokens=spec.get("Ts", 4), window_tokens=spec.get("Tw", 2),
                              relevancy_tier=spec.get("relevancy_tier", "per_head"))
    except TypeError as e:
        raise SoljaxError(f"bad settings: {e}") from None


def score_schedules(cfg: LMConfig, params: dict, spec: dict) -> dict:
    """Runs every schedule on every block; returns ``{"results": [...]}`` (see the module doc)."""
    if not isinstance(spec, dict):
        raise SoljaxError("input must be a JSON object with 'blocks' and 'schedules'")
    names, kappa, rho, bits = _schedules(spec)
    scfg = _sparsity(spec)
    T = kappa.shape[1]
    blocks = spec.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise SoljaxError("input needs a non-empty list 'blocks' of token-id lists")
    for i, b in enumerate(blocks):
        if not isinstance(b, list) or len(b) < T + 2:
            raise SoljaxError(f"block {i} needs at least T + 2 = {T + 2} token ids (a context, then T + 1)")
        cfg.check_length(len(b), f"block {i}")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < cfg.vocab_size for x in b):
            raise SoljaxError(f"block {i} has token ids outside [0, {cfg.vocab_size})")
    out: list[dict | None] = [None] * (len(blocks) * len(names))
    for length in sorted({len(b) for b in blocks}):
        idx = [i for i, b in enumerate(blocks) if len(b) == length]
        res = run_schedules(cfg, scfg, params, jnp.asarray([blocks[i] for i in idx], jnp.int32),
                            jnp.asarray(kappa), jnp.asarray(rho), jnp.asarray(bits), length - T - 1)
        lp, att, eff = (np.asarray(a) for a in (res.logprobs, res.attended, res.effective))
        usage = np.asarray(episode_usage(res.usage, res.effective))  # [B, K, 3]
        for row, i in enumerate(idx):
            for k, name in enumerate(names):
                mean = float(lp[row, k].mean())
                out[i * len(names) + k] = {
                    "block": i, "schedule": name,
                    "logprobs": [float(x) for x in lp[row, k]],
                    "attended_fraction": [float(x) for x in att[row, k]],
                    "effective": [bool(x) for x in eff[row, k]],
                    "mean_logprob": mean,
                    "ppl": math.exp(-mean),
                    "usage": dict(zip(("token", "prune", "quant"), map(float, usage[row, k]))),
                }
    return {"results": out}
