"""The counterfactual rollout engine: one dense prefill per block, K schedules over T steps.

For each block of ``M + T + 1`` tokens, the first M are prefilled densely once (shared prefix);
then, for t = 0..T-1, every schedule feeds token ``M + t`` under the compute its *controller*
chooses and is scored on token ``M + t + 1``. All B x K rows run in one ``lax.scan`` over t inside
one compiled call. Training, every baseline, evaluation and schedule experiments use this engine;
only the controller changes (see :mod:`soljax.controllers`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soljax.grpo import kl_categorical
from soljax.lm import model as lm
from soljax.lm.config import LMConfig
from soljax.lm.controlled import (Controls, SharedPrefix, SparsityConfig, SuffixCache, controlled_step,
                                  prefill_shared)

NUM_SCALARS = 8


class Observation(NamedTuple):
    """What a controller sees before step t, per row ``[B, K, ...]``.

    ``h_prev``: LM final-norm hidden state of the previous position (after the prefill at t=0);
    ``tokens``/``tok_emb``: the token about to be processed and its LM input embedding;
    ``scalars [B, K, 8]``: ``(t+1)/T, effective, C_tok, C_pru, C_q, dev_tok, dev_pru, dev_q`` with
    ``dev`` the running mean usage over earlier effective steps minus the target (0 before any);
    ``prev_action``: the previous action id (the controller's BOS id at t=0); ``t``: step index;
    ``steps_left``: the effective steps from this one to the end of the episode, this one included
    (what a controller can still spend its budget on).
    Only for controllers with ``needs_lm_signals = True`` (else None): ``lm_entropy`` and
    ``lm_margin [B, K]``, the normalized entropy ``H(p) / log V`` and top-1 minus top-2
    probability of the LM distribution that predicted the current token (the previous step's, or
    the prefill's at t=0), and ``prev_tok_emb``, the embedding of the previous input token.
    """

    h_prev: jax.Array
    tokens: jax.Array
    tok_emb: jax.Array
    scalars: jax.Array
    prev_action: jax.Array
    t: jax.Array
    steps_left: jax.Array
    lm_entropy: jax.Array | None = None
    lm_margin: jax.Array | None = None
    prev_tok_emb: jax.Array | None = None


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


def steps_left(effective_tb: np.ndarray | jax.Array) -> jax.Array:
    """Per step, the effective steps from it to the end: reverse cumulative sum over axis 0."""
    eff = jnp.asarray(effective_tb, jnp.int32)
    return jnp.flip(jnp.cumsum(jnp.flip(eff, 0), 0), 0)


def step_scalars(t, T: int, effective, targets, usage_sum, eff_count):
    """The 8 policy scalars ``[B, K, 8]`` for step t (see :class:`Observation`)."""
    B, K = effective.shape
    tgt = jnp.broadcast_to(targets[:, None, :], (B, K, 3))
    mean = jnp.where(eff_count[..., None] > 0, usage_sum / jnp.maximum(eff_count, 1)[..., None], tgt)
    frac = jnp.full((B, K, 1), (t + 1) / T, jnp.float32)
    return jnp.concatenate([frac, effective[..., None].astype(jnp.float32), tgt, mean - tgt], axis=-1)


def usage_per_step(controls: Controls, rho_max: float) -> jax.Array:
    """``[..., 3]`` nominal usage (kappa, rho / rho_max, bits / 16) of controls ``[...]``."""
    return jnp.stack([controls.kappa.astype(jnp.float32), controls.rho.astype(jnp.float32) / rho_max,
                      controls.bits.astype(jnp.float32) / 16.0], axis=-1)


def applied_usage(controls: Controls, effective: jax.Array, rho_max: float) -> jax.Array:
    """``[..., 3]`` nominal usage of the controls a step actually applied: the chosen ones on
    effective steps, dense elsewhere."""
    applied = Controls(kappa=jnp.where(effective, controls.kappa, 1.0), rho=jnp.where(effective, controls.rho, 1.0),
                       bits=jnp.where(effective, controls.bits, 16))
    return usage_per_step(applied, rho_max)


def episode_usage(usage: jax.Array, effective: jax.Array) -> jax.Array:
    """Mean of ``usage [..., T, 3]`` over effective steps -> ``[..., 3]``."""
    eff = effective.astype(jnp.float32)[..., None]
    return (usage * eff).sum(-2) / jnp.maximum(eff.sum(-2), 1.0)


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


def lm_signals(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalized entropy and top-1 minus top-2 probability of next-token ``logits [..., V]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -(jnp.exp(logp) * logp).sum(-1) / jnp.log(logits.shape[-1])
    top2 = jnp.exp(jax.lax.top_k(logp, 2)[0])
    return entropy, top2[..., 0] - top2[..., 1]


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "controller", "context_len", "schedules",
                                             "dense_kl", "feed_effective",
                                             "record_kept", "copy_prefix"))
def rollout(cfg: LMConfig, scfg: SparsityConfig, params: dict, blocks: jax.Array, targets: jax.Array,
            controller, ctrl_params: Any, key: jax.Array, *, context_len: int, schedules: int,
            dense_kl: bool = False, feed_effective: bool = False, record_kept: bool = False,
            copy_prefix: bool = False, prefilled: Prefilled | None = None) -> Trajectory:
    """Runs ``schedules`` (K) controlled rollouts per block, teacher-forced.

    ``blocks [B, M + T + 1]`` token ids with ``M = context_len``; ``targets [B, 3]`` budget targets
    (token, prune, quant ratio) shared by a block's K rollouts; ``controller``: a static object
    with ``init(ctrl_params, B, K, T)`` and ``act(ctrl_params, state, obs, targets, key) ->
    (controls, actions, logp, state)`` plus attributes ``bos_id`` and ``rho_max`` (see
    :mod:`soljax.controllers`); ``dense_kl`` adds one dense row per block and records
    KL(dense || compressed); ``feed_effective`` feeds back the action actually applied (dense on
    non-effective steps) instead of the chosen one. ``copy_prefix`` copies each block's context
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
    signals = getattr(controller, "needs_lm_signals", False)
    if copy_prefix:  # one full copy of the context cache per row, as [B * R] blocks of one row
        prefix = jax.tree.map(lambda a: jnp.repeat(a, R, axis=1 if a.ndim > 2 else 0), prefix)
    targets = targets.astype(jnp.float32)
    carry = dict(
        suffix=SuffixCache.empty(cfg, B * R, 1, T) if copy_prefix else SuffixCache.empty(cfg, B, R, T),
        h_prev=jnp.broadcast_to(h0[:, None], (B, K, h0.shape[-1])),
        prev_action=jnp.full((B, K), controller.bos_id, jnp.int32),
        usage_sum=jnp.zeros((B, K, 3), jnp.float32),
        eff_count=jnp.zeros((B, K), jnp.float32),
        state=controller.init(ctrl_params, B, K, T),
        key=key,
    )
    if signals:
        ent, margin = lm_signals(lm.logits(cfg, params, h0))
        carry["signals"] = (jnp.broadcast_to(ent[:, None], (B, K)), jnp.broadcast_to(margin[:, None], (B, K)))
    dense_row = Controls(kappa=jnp.ones((B, 1)), rho=jnp.ones((B, 1)), bits=jnp.full((B, 1), 16, jnp.int32))

    left = steps_left(M + np.arange(T) + 1 > scfg.min_effective_kv)  # [T]

    def step(c, t):
        tokens = jnp.broadcast_to(blocks[:, M + t][:, None], (B, K))
        effective = jnp.broadcast_to(M + t + 1 > scfg.min_effective_kv, (B, K))
        obs = Observation(h_prev=c["h_prev"], tokens=tokens, tok_emb=lm.embed(params, tokens),
                          scalars=step_scalars(t, T, effective, targets, c["usage_sum"], c["eff_count"]),
                          prev_action=c["prev_action"], t=t, steps_left=jnp.broadcast_to(left[t], (B, K)))
        if signals:
            prev_tokens = jnp.broadcast_to(blocks[:, M + t - 1][:, None], (B, K))
            obs = obs._replace(lm_entropy=c["signals"][0], lm_margin=c["signals"][1],
                               prev_tok_emb=lm.embed(params, prev_tokens))
        key, sub = jax.random.split(c["key"])
        controls, actions, logp_a, state = controller.act(ctrl_params, c["state"], obs, targets, sub)
        rows = controls
        if dense_kl:
            rows = Controls(*(jnp.concatenate([a.astype(d.dtype), d], axis=1) for a, d in zip(controls, dense_row)))
            tokens_r = jnp.broadcast_to(blocks[:, M + t][:, None], (B, R))
        else:
            tokens_r = tokens
        if copy_prefix:
            flat = lambda a: a.reshape(B * R, 1)  # noqa: E731
            logits, h, suffix, info = controlled_step(cfg, scfg, params, prefix, c["suffix"], flat(tokens_r),
                                                      Controls(*map(flat, rows)))
            logits, h = logits.reshape(B, R, -1), h.reshape(B, R, -1)
            info = jax.tree.map(lambda a: a.reshape((B, R) + a.shape[2:]), info)
        else:
            logits, h, suffix, info = controlled_step(cfg, scfg, params, prefix, c["suffix"], tokens_r, rows)
        label = blocks[:, M + t + 1]
        logp = jax.nn.log_softmax(logits[:, :K], axis=-1)
        logp_true = jnp.take_along_axis(logp, jnp.broadcast_to(label[:, None, None], (B, K, 1)), -1)[..., 0]
        kl = kl_categorical(logits[:, K:], logits[:, :K]) if dense_kl else jnp.zeros((B, K), jnp.float32)
        usage = applied_usage(controls, effective, controller.rho_max)
        eff = effective.astype(jnp.float32)
        fed = jnp.where(effective, actions, controller.dense_id) if feed_effective else actions
        new = dict(suffix=suffix, h_prev=h[:, :K], prev_action=fed.astype(jnp.int32),
                   usage_sum=c["usage_sum"] + usage * eff[..., None], eff_count=c["eff_count"] + eff,
                   state=state, key=key)
        if signals:
            new["signals"] = lm_signals(logits[:, :K])
        out = (actions, logp_a, logp_true, kl, effective, info.attended[:, :K], usage, obs.h_prev,
               obs.scalars, obs.prev_action, info.kept_keys[:, :K] if record_kept else None)
        return new, out

    carry, outs = jax.lax.scan(step, carry, jnp.arange(T))
    move = lambda a: jnp.moveaxis(a, 0, 2)  # noqa: E731  [T, B, K, ...] -> [B, K, T, ...]
    actions, logp_a, logp_true, kl, effective, attended, usage, h_prev, scalars, prev_action = map(move, outs[:-1])
    return Trajectory(actions=actions, logp_actions=logp_a, logp_true=logp_true, kl_dense=kl,
                      effective=effective, attended=attended, usage=usage, h_prev=h_prev, scalars=scalars,
                      prev_action=prev_action, tokens=blocks[:, M:M + T], h_last=carry["h_prev"],
                      kept_keys=None if outs[-1] is None else move(outs[-1]))


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
    from soljax.controllers import GivenControls

    B = blocks.shape[0]
    kappa, rho, bits = (jnp.broadcast_to(jnp.asarray(a), (B,) + jnp.shape(a)[-2:]) for a in (kappa, rho, bits))
    controls = Controls(kappa.astype(jnp.float32), rho.astype(jnp.float32), bits.astype(jnp.int32))
    K = kappa.shape[1]
    traj = rollout(cfg, scfg, params, blocks, jnp.ones((B, 3)), GivenControls(), controls,
                   jax.random.PRNGKey(0), context_len=context_len, schedules=K, record_kept=True)
    hidden = jnp.concatenate([traj.h_prev[:, :, 1:], traj.h_last[:, :, None]], axis=2)
    return ScheduleScores(logprobs=traj.logp_true, attended=traj.attended, effective=traj.effective,
                          usage=traj.usage, hidden=hidden, kept_keys=traj.kept_keys)
