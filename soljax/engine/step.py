"""The one controlled step: observe, act, run the LM under the chosen controls, account usage.

Both loops of the engine call :func:`controlled_decode` once per step: the teacher-forced rollout
(:mod:`soljax.engine.rollout`, K schedules per block) and serving (:mod:`soljax.engine.episodes`,
one row per prompt). What differs between them (where the next token comes from, what is recorded,
how the random key is split) stays in the loops; everything a controller sees and everything the
LM computes under its controls happens here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from soljax.engine.observe import Controller, Observation, applied_usage, lm_signals, step_scalars
from soljax.lm import model as lm
from soljax.lm.config import LMConfig
from soljax.lm.controlled import Controls, SharedPrefix, SparsityConfig, StepInfo, SuffixCache, controlled_step
from soljax.lm.fast_step import FastPath, fast_step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepCarry:
    """What one step hands the next, per row ``[B, K, ...]``.

    ``suffix``: the K/V entries of the steps so far (the context lives in the shared prefix);
    ``h_prev [B, K, D]``: final-norm hidden state of the previous position; ``prev_action [B, K]``:
    the action fed back to the controller; ``usage_sum [B, K, 3]`` / ``eff_count [B, K]``: applied
    usage summed over the effective steps so far, and their number; ``ctrl``: the controller's
    state; ``signals``: ``(entropy, margin) [B, K]`` of the LM distribution that predicted the
    current token (only for controllers that need LM signals, else None).
    """

    suffix: SuffixCache
    h_prev: jax.Array
    prev_action: jax.Array
    usage_sum: jax.Array
    eff_count: jax.Array
    ctrl: Any
    signals: tuple[jax.Array, jax.Array] | None

    @classmethod
    def start(cls, cfg: LMConfig, params: dict, controller: Controller, ctrl_params: Any, suffix: SuffixCache,
              h0_bd: jax.Array, K: int, T: int) -> "StepCarry":
        """The carry at t=0 of an episode whose context ends in hidden state ``h0_bd [B, D]``."""
        B = h0_bd.shape[0]
        signals = None
        if controller.needs_lm_signals:
            signals = tuple(jnp.broadcast_to(s[:, None], (B, K)) for s in lm_signals(lm.logits(cfg, params, h0_bd)))
        return cls(suffix=suffix, h_prev=jnp.broadcast_to(h0_bd[:, None], (B, K, h0_bd.shape[-1])),
                   prev_action=jnp.full((B, K), controller.bos_id, jnp.int32),
                   usage_sum=jnp.zeros((B, K, 3), jnp.float32), eff_count=jnp.zeros((B, K), jnp.float32),
                   ctrl=controller.init(ctrl_params, B, K, T), signals=signals)


class StepOut(NamedTuple):
    """One step's results: the ``obs`` the controller saw; its ``actions`` and their log-probability
    ``logp_actions [B, K]``; ``logits [B, R, V]`` and ``info`` of the LM step over its R rows (the K
    controlled rows, then the dense rows asked for); ``usage [B, K, 3]`` applied this step."""

    obs: Observation
    actions: jax.Array
    logp_actions: jax.Array
    logits: jax.Array
    info: StepInfo
    usage: jax.Array


def controlled_decode(cfg: LMConfig, scfg: SparsityConfig, params: dict, prefix: SharedPrefix, controller: Controller,
                      ctrl_params: Any, carry: StepCarry, key: jax.Array, *, t: jax.Array, T: int,
                      tokens_bk: jax.Array, prev_tokens_bk: jax.Array | None, effective_bk: jax.Array,
                      steps_left_bk: jax.Array, targets_b3: jax.Array, dense_rows: int = 0,
                      copied_prefix: bool = False, feed_effective: bool = True,
                      fast: FastPath | None = None) -> tuple[StepCarry, StepOut]:
    """Step t of every row: build the observation, let ``controller`` act, run the LM step.

    ``tokens_bk``: the inputs; ``prev_tokens_bk``: the inputs before them (read only for
    controllers that need LM signals); ``effective_bk``: whether the step may compress;
    ``steps_left_bk``: effective steps from this one to the episode's end; ``dense_rows``: extra rows
    per block run densely on the same token (for the KL to the dense model); ``copied_prefix``: the
    prefix holds one copy of each block's context per row (``[B * R]`` blocks of one row);
    ``feed_effective``: feed back the action applied (dense on non-effective steps) rather than the
    one chosen; ``fast``: run the LM step as :func:`~soljax.lm.fast_step.fast_step` (one schedule
    per row, no dense rows, shared prefix), which reads only what each step's levels need.
    """
    B, K = tokens_bk.shape
    obs = Observation(h_prev=carry.h_prev, tokens=tokens_bk, tok_emb=lm.embed(params, tokens_bk),
                      scalars=step_scalars(t, T, effective_bk, targets_b3, carry.usage_sum, carry.eff_count),
                      prev_action=carry.prev_action, t=t, steps_left=steps_left_bk, usage_sum=carry.usage_sum,
                      eff_count=carry.eff_count)
    if controller.needs_lm_signals:
        obs = obs._replace(lm_entropy=carry.signals[0], lm_margin=carry.signals[1],
                           prev_tok_emb=lm.embed(params, prev_tokens_bk))
    controls, actions, logp_a, ctrl = controller.act(ctrl_params, carry.ctrl, obs, targets_b3, key)
    rows, tokens = controls, tokens_bk
    if dense_rows:
        dense = Controls(kappa=jnp.ones((B, dense_rows)), rho=jnp.ones((B, dense_rows)),
                         bits=jnp.full((B, dense_rows), 16, jnp.int32))
        rows = Controls(*(jnp.concatenate([a.astype(d.dtype), d], axis=1) for a, d in zip(controls, dense)))
        tokens = jnp.concatenate([tokens_bk, jnp.broadcast_to(tokens_bk[:, :1], (B, dense_rows))], axis=1)
    R = K + dense_rows
    if fast is not None:
        if R != 1 or copied_prefix:
            raise ValueError(f"the fast decode step serves one schedule per row, got {B} x {R} rows")
        logits, h, suffix, info = fast_step(cfg, scfg, fast, params, prefix, carry.suffix, tokens, rows)
    elif copied_prefix:
        flat = lambda a: a.reshape(B * R, 1)  # noqa: E731
        logits, h, suffix, info = controlled_step(cfg, scfg, params, prefix, carry.suffix, flat(tokens),
                                                  Controls(*map(flat, rows)))
        logits, h = logits.reshape(B, R, -1), h.reshape(B, R, -1)
        info = jax.tree.map(lambda a: a.reshape((B, R) + a.shape[2:]), info)
    else:
        logits, h, suffix, info = controlled_step(cfg, scfg, params, prefix, carry.suffix, tokens, rows)
    usage = applied_usage(controls, effective_bk, controller.rho_max)
    eff = effective_bk.astype(jnp.float32)
    fed = jnp.where(effective_bk, actions, controller.dense_id) if feed_effective else actions
    new = StepCarry(suffix=suffix, h_prev=h[:, :K], prev_action=fed.astype(jnp.int32),
                    usage_sum=carry.usage_sum + usage * eff[..., None], eff_count=carry.eff_count + eff, ctrl=ctrl,
                    signals=lm_signals(logits[:, :K]) if controller.needs_lm_signals else None)
    return new, StepOut(obs=obs, actions=actions, logp_actions=logp_a, logits=logits, info=info, usage=usage)
