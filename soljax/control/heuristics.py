"""Handcrafted budget-matched controllers: EMC (entropy/margin) and DAC (hidden-state drift).

Both pick, per axis and per step, between the two grid levels that bracket the usage the sequence
still needs, ``c_req = (target * (n + R) - S) / R`` (``n`` effective steps so far with usage sum
``S``, ``R`` effective steps left including this one): the upper level iff

    p_hi + gamma * (u - 0.5) >= 0.5,        p_hi = (c_req - lo) / (hi - lo),

with a per-token difficulty signal ``u`` in [0, 1]. A feasibility guard then keeps the target
reachable: the choice is switched to the other level whenever keeping it would move the usage
required of the remaining ``R - 1`` steps outside the grid's range (which, with two levels
bracketing ``c_req``, one of them always avoids). So the episode mean ends within one grid step
of the target, like the fixed baseline's, but compute goes where ``u`` is high.

* **EMC**: ``u = mix * H(p) / log V + (1 - mix) * (1 - (p1 - p2))`` of the LM distribution that
  predicted the current token (the prefill's at t = 0). The default ``mix = 1`` is the reference
  implementation's setting: its signal is then the normalized entropy alone.
* **DAC**: ``u = (1 - cos(h_{t-1}, h_{t-2})) / 2`` of consecutive final-norm hidden states (at
  t = 0 the drift between the embeddings of the last context token and the current token).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from soljax.compress.actions import ActionGrid
from soljax.control.budget import axis_levels, compose_actions
from soljax.control.given import GridController
from soljax.control.registry import register_controller

_EPS = 1e-6


def _cosine(a, b):
    num = (a * b).sum(-1)
    den = jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return num / jnp.maximum(den, 1e-12)


def guarded_choice(levels: np.ndarray, target, usage_sum, count, remaining, u, gamma: float):
    """Per row: index into ``levels`` chosen for this step (see the module doc).

    ``target``, ``usage_sum``, ``count`` (effective steps so far), ``remaining`` (steps left
    including this one) and ``u`` broadcast together.
    """
    vals = np.sort(np.asarray(levels, np.float64)).astype(np.float32)
    order = np.argsort(np.asarray(levels, np.float64), kind="stable")
    lo_v, hi_v = float(vals[0]), float(vals[-1])
    R = jnp.maximum(remaining, 1).astype(jnp.float32)
    need = target * (count + R) - usage_sum  # usage the remaining R steps must add up to
    c_req = jnp.clip(need / R, lo_v, hi_v)
    hi_pos = jnp.clip(jnp.searchsorted(jnp.asarray(vals), c_req - _EPS, side="left"), 0, len(vals) - 1)
    lo_pos = jnp.where(jnp.asarray(vals)[hi_pos] > c_req + _EPS, jnp.maximum(hi_pos - 1, 0), hi_pos)
    lo, hi = jnp.asarray(vals)[lo_pos], jnp.asarray(vals)[hi_pos]
    p_hi = jnp.where(hi > lo, (c_req - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)
    up = p_hi + gamma * (u - 0.5) >= 0.5
    # feasible values for this step: the rest must then need between lo_v and hi_v per step
    lower = need - (R - 1) * hi_v
    upper = need - (R - 1) * lo_v
    guard = R > 1
    up = jnp.where(guard & ~up & (lo < lower - _EPS), True, up)
    up = jnp.where(guard & up & (hi > upper + _EPS), False, up)
    return jnp.asarray(order)[jnp.where(up, hi_pos, lo_pos)]


@dataclasses.dataclass(frozen=True)
class Heuristic(GridController):
    """Base of the guarded two-level heuristics: subclasses give the difficulty ``signal``; the
    spent budget is the engine's (``obs.usage_sum``, ``obs.eff_count``)."""

    grid: ActionGrid
    gamma: float = 0.35

    needs_lm_signals = True

    def init(self, ctrl_params, B, K, T):
        return ()

    def signal(self, obs, state) -> "jnp.ndarray":  # [B, K] difficulty in [0, 1]
        raise NotImplementedError

    def next_state(self, obs, state):
        return state

    def act(self, ctrl_params, state, obs, targets, key):
        B, K = obs.tokens.shape
        u = jnp.clip(self.signal(obs, state), 0.0, 1.0)
        idx = [guarded_choice(lv, targets[:, None, axis], obs.usage_sum[..., axis], obs.eff_count, obs.steps_left, u,
                              self.gamma) for axis, lv in enumerate(axis_levels(self.grid))]
        actions = compose_actions(self.grid, idx).astype(jnp.int32)
        return self.controls(actions), actions, jnp.zeros((B, K), jnp.float32), self.next_state(obs, state)


@register_controller("emc")
@dataclasses.dataclass(frozen=True)
class EntropyMarginController(Heuristic):
    """EMC: more compute where the LM was uncertain about the current token (see the module doc)."""

    mix: float = 1.0

    def signal(self, obs, state):
        return self.mix * obs.lm_entropy + (1.0 - self.mix) * (1.0 - obs.lm_margin)


@register_controller("dac")
@dataclasses.dataclass(frozen=True)
class DriftController(Heuristic):
    """DAC: more compute where the hidden state is drifting (see the module doc); ``hidden_size``
    is the LM's, for the state that keeps the hidden state before the previous one."""

    hidden_size: int = 0

    def init(self, ctrl_params, B, K, T):
        return jnp.zeros((B, K, self.hidden_size), jnp.float32)  # h_{t-2}

    def signal(self, obs, h_before):
        first = 0.5 * (1.0 - _cosine(obs.prev_tok_emb, obs.tok_emb))
        return jnp.where(obs.t == 0, first, 0.5 * (1.0 - _cosine(obs.h_prev, h_before)))

    def next_state(self, obs, state):
        return obs.h_prev
