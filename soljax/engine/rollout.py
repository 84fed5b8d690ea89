"""The counterfactual rollout engine: one dense prefill per block, K schedules over T steps.

For each block of ``M + T + 1`` tokens, the first M are prefilled densely once (shared prefix);
then, for t = 0..T-1, every schedule feeds token ``M + t`` under the compute its *controller*
chooses and is scored on token ``M + t + 1``. All B x K rows run in one ``lax.scan`` over t inside
one compiled call. Training, every baseline, evaluation and schedule experiments use this engine;
only the controller changes (see :mod:`soljax.control`). Each step is
:func:`soljax.engine.step.controlled_decode`, the same step serving uses.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soljax.distributions import kl_categorical
from soljax.engine.observe import Controller, steps_left
from soljax.engine.step import StepCarry, controlled_decode
from soljax.lm.config import LMConfig
from soljax.lm.controlled import SharedPrefix, SparsityConfig, SuffixCache, prefill_shared


class Trajectory(NamedTuple):
    """A rollout, per ``[B, K, T]`` unless noted.

    ``actions``/``logp_actions``: controller choices and their log-probabilities (0 for
    deterministic controllers); ``logp_true``: log p of the true next token; ``kl_dense``:
    KL(dense || compressed) of the next-token distribution (zeros unless requested);
    ``effective``; ``attended`` (realized attended fraction); ``usage [B, K, T, 3]`` (nominal:
    kappa, rho / rho_max, bits / 16); the observations ``h_prev [B, K, T, D]``, ``scalars
    [B, K, T, 8]``, ``prev_action``; ``tokens [B, T]`` the inputs; ``h_last [B, K, D]`` the hidden
    state after the last step; ``kept_keys [B, K, T, L, Hq]`` keys attended per layer and query
    head (only with ``record_kept``).
    """

    actions: jax.Array
    logp_actions: jax.Array
    logp_true: jax.Array
    kl_dense: jax.Array
    effective: jax.Array
    attended: jax.Array
    usage: jax.Array
    h_prev: jax.Array
    scalars: jax.Array
    prev_action: jax.Array
    tokens: jax.Array
    h_last: jax.Array
    kept_keys: jax.Array | None = None


class Prefilled(NamedTuple):
    """A batch of blocks' dense context prefill: ``h0 [B, D]`` (final-norm hidden state of the last
    context token) and the :class:`SharedPrefix`. Reusable across rollouts of the same blocks."""

    h0: jax.Array
    prefix: SharedPrefix


def prefill_blocks(cfg: LMConfig, scfg: SparsityConfig, params: dict, blocks: jax.Array,
                   context_len: int) -> Prefilled:
    """Prefills the first ``context_len`` tokens of every block ``[B, N]``."""
    B = blocks.shape[0]
    return Prefilled(*prefill_shared(cfg, scfg, params, jnp.asarray(blocks)[:, :context_len],
                                     jnp.full((B,), context_len, jnp.int32)))


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "controller", "context_len", "schedules",
                                             "dense_kl", "feed_effective",
                                             "record_kept", "copy_prefix"))
def rollout(cfg: LMConfig, scfg: SparsityConfig, params: dict, blocks: jax.Array, targets: jax.Array,
            controller: Controller, ctrl_params: Any, key: jax.Array, *, context_len: int, schedules: int,
            dense_kl: bool = False, feed_effective: bool = True, record_kept: bool = False,
            copy_prefix: bool = False, prefilled: Prefilled | None = None) -> Trajectory:
    """Runs ``schedules`` (K) controlled rollouts per block, teacher-forced.

    ``blocks [B, M + T + 1]`` token ids with ``M = context_len``; ``targets [B, 3]`` budget targets
    (token, prune, quant ratio) shared by a block's K rollouts; ``controller``: any
    :class:`~soljax.engine.observe.Controller` (static), its arrays ``ctrl_params``; ``dense_kl`` adds one dense row per block and records
    KL(dense || compressed); ``feed_effective`` (the default, as at evaluation and run time) feeds
    back the action actually applied (dense on non-effective steps); training passes False to feed
    back the sampled one, as the reference does. ``copy_prefix`` copies each block's context
    cache once per schedule, as the reference implementation does (for benchmarks: the results
    are the same, the memory and time are not). ``prefilled``: the blocks' context prefill from
    :func:`prefill_blocks`, to share one prefill between several rollouts of the same blocks.
    """
    B, N = blocks.shape
    M, K = context_len, schedules
    T = N - M - 1
    if T < 1:
        raise ValueError(f"blocks of {N} tokens leave no step after a context of {M}")
    R = K + 1 if dense_kl else K
    h0, prefix = prefill_blocks(cfg, scfg, params, blocks, M) if prefilled is None else prefilled
    if copy_prefix:  # one full copy of the context cache per row, as [B * R] blocks of one row
        prefix = jax.tree.map(lambda a: jnp.repeat(a, R, axis=1 if a.ndim > 2 else 0), prefix)
    targets = targets.astype(jnp.float32)
    suffix = SuffixCache.empty(cfg, B * R, 1, T) if copy_prefix else SuffixCache.empty(cfg, B, R, T)
    start = StepCarry.start(cfg, params, controller, ctrl_params, suffix, h0, K, T)
    effective_t = M + np.arange(T) + 1 > scfg.min_effective_kv  # [T]
    left = steps_left(effective_t)

    def step(c, t):
        carry, key = c
        key, sub = jax.random.split(key)
        tokens = jnp.broadcast_to(blocks[:, M + t][:, None], (B, K))
        effective = jnp.broadcast_to(jnp.asarray(effective_t)[t], (B, K))
        carry, out = controlled_decode(
            cfg, scfg, params, prefix, controller, ctrl_params, carry, sub, t=t, T=T, tokens_bk=tokens,
            prev_tokens_bk=jnp.broadcast_to(blocks[:, M + t - 1][:, None], (B, K)),
            effective_bk=effective,
            steps_left_bk=jnp.broadcast_to(left[t], (B, K)), targets_b3=targets, dense_rows=R - K,
            copied_prefix=copy_prefix, feed_effective=feed_effective)
        label = blocks[:, M + t + 1]
        logp = jax.nn.log_softmax(out.logits[:, :K], axis=-1)
        logp_true = jnp.take_along_axis(logp, jnp.broadcast_to(label[:, None, None], (B, K, 1)), -1)[..., 0]
        kl = kl_categorical(out.logits[:, K:], out.logits[:, :K]) if dense_kl else jnp.zeros((B, K), jnp.float32)
        obs = out.obs
        record = (out.actions, out.logp_actions, logp_true, kl, effective, out.info.attended[:, :K],
                  out.usage, obs.h_prev, obs.scalars, obs.prev_action,
                  out.info.kept_keys[:, :K] if record_kept else None)
        return (carry, key), record

    (carry, _), outs = jax.lax.scan(step, (start, key), jnp.arange(T))
    move = lambda a: jnp.moveaxis(a, 0, 2)  # noqa: E731  [T, B, K, ...] -> [B, K, T, ...]
    actions, logp_a, logp_true, kl, effective, attended, usage, h_prev, scalars, prev_action = map(move, outs[:-1])
    return Trajectory(actions=actions, logp_actions=logp_a, logp_true=logp_true, kl_dense=kl,
                      effective=effective, attended=attended, usage=usage, h_prev=h_prev, scalars=scalars,
                      prev_action=prev_action, tokens=blocks[:, M:M + T], h_last=carry.h_prev,
                      kept_keys=None if outs[-1] is None else move(outs[-1]))
