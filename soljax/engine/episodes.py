"""Controlled decoding in episodes with dense replay: the engine behind policy generation and scoring.

Serving mirrors training. A batch of prompts (right-padded, per-row lengths) is prefilled densely
*except each prompt's last token*, which becomes the first controlled input (the reference
runtime's convention, SOL_REFERENCE_SPEC.md section 10). Decoding then runs in **episodes** of T
steps, T being the policy's training horizon:

* at an episode start the dense KV cache (prompt plus every finished episode) is wrapped as the
  episode's :class:`~soljax.lm.controlled.SharedPrefix` (with QUEST page summaries, computed once
  at the prefill and refreshed after each replay on the pages it wrote), exactly like a
  training block's context, and the controller starts a fresh episode (BOS previous action, zero
  running budget sums, fresh policy cache);
* each step is the engine's one controlled step (:func:`soljax.engine.step.controlled_decode`), the
  same as in training: the controller chooses from the same observation, one token per row runs
  under its controls, and its K/V entries go to the episode's suffix cache;
* the next input is either sampled from the step's logits (generation) or forced (teacher-forced
  scoring);
* at the episode end the episode's inputs are **replayed densely** into the dense cache
  (:func:`soljax.lm.model.extend`), replacing the compressed ("polluted") K/V entries, and the next
  episode's ``h_prev`` is the last hidden state of that replay. Serving may skip the replay
  (``replay=False``): the cache then keeps the entries the steps computed under their controls,
  which saves the replay's dense pass over the whole cache at the price of that pollution.

:func:`run_episode` is one compiled program per (batch, cache capacity, controller): the T steps
are a ``lax.scan`` whose carry holds the suffix cache, and the dense cache is donated, so it is
updated in place. The host calls it once per episode (checking EOS and stop strings in between).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soljax.distributions import sample_token
from soljax.engine.observe import Controller, steps_left
from soljax.engine.step import StepCarry, controlled_decode
from soljax.errors import SoljaxError
from soljax.lm import model as lm
from soljax.lm.config import LMConfig
from soljax.lm.controlled import (SparsityConfig, SuffixCache, page_summaries_of, refresh_page_summaries_of,
                                  shared_prefix_from_cache)
from soljax.lm.fast_step import FastPath


# The fast step runs one branch per axis and layer for the whole batch, sparse only when every
# row's level allows it: the more rows, the less often they agree and the less it can skip.
MAX_FAST_BATCH = 8


@dataclasses.dataclass(frozen=True, eq=False)
class ControlledModel:
    """The frozen LM plus whoever chooses its per-token compute.

    ``controller``: any :class:`~soljax.engine.observe.Controller` (static, hashable);
    ``ctrl_params``: its arrays, or a function ``(targets [B, 3] numpy) -> ctrl_params`` for
    controllers whose arrays depend on the batch (a budget-matched fixed schedule, raw
    ``[B, 1, T]`` controls); ``episode_len``: T, the horizon between dense replays (the policy's
    training ``rollout_len``); ``fast``: the fast decode path (:mod:`soljax.lm.fast_step`) used
    for batches of up to :data:`MAX_FAST_BATCH` prompts (None: always the masked step);
    ``replay``: replay each finished episode densely (the reference's KV refresh), or keep its
    compressed entries (see :func:`run_episode`).
    """

    cfg: LMConfig
    params: dict
    scfg: SparsityConfig
    controller: Controller
    ctrl_params: Any
    episode_len: int
    fast: FastPath | None = None
    replay: bool = True

    def __post_init__(self):
        T = self.episode_len
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise SoljaxError(f"episode_len must be a positive integer, got {T!r}")
        if not isinstance(self.replay, bool):
            raise SoljaxError(f"replay must be true or false, got {self.replay!r}")

    def params_for(self, targets_b3: np.ndarray):
        """The controller's arrays for a batch with these targets."""
        return self.ctrl_params(targets_b3) if callable(self.ctrl_params) else self.ctrl_params

    def fast_for(self, batch: int) -> FastPath | None:
        """The fast path for a batch of ``batch`` prompts: ``fast`` for small batches under QUEST,
        else None."""
        return self.fast if batch <= MAX_FAST_BATCH and self.scfg.criterion == "quest" else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What carries over from one episode to the next, per row.

    ``cache``: the dense KV cache ``[L, B, S, Hkv, Dh]`` (prompt minus its last token, then every
    finished episode replayed densely); ``h_prev [B, D]``: final-norm hidden state of the last
    dense position (zeros when nothing precedes); ``token [B]``: the next input;
    ``prev_token [B]``: the input before it; ``key``: the sampling key; ``summaries``: the
    cache's QUEST page summaries ``(kmax, kmin) [L, B, P, Hkv, Dh]`` (None for the other criteria),
    refreshed after each replay only where it wrote.
    """

    cache: lm.KVCache
    h_prev: jax.Array
    token: jax.Array
    prev_token: jax.Array
    key: jax.Array
    summaries: tuple[jax.Array, jax.Array] | None


class EpisodeOut(NamedTuple):
    """One episode, per ``[B, T]``: ``inputs`` (tokens fed), ``next_tokens`` (sampled or forced),
    ``logprobs`` (log p of ``next_tokens`` under the controlled model), ``greedy`` (next token is
    the argmax), ``usage [B, T, 3]`` (applied nominal usage: kappa, rho / rho_max, bits / 16),
    ``effective``, ``actions`` (controller action ids; -1 for raw-controls controllers),
    ``attended`` (realized attended fraction of the keys)."""

    inputs: jax.Array
    next_tokens: jax.Array
    logprobs: jax.Array
    greedy: jax.Array
    usage: jax.Array
    effective: jax.Array
    actions: jax.Array
    attended: jax.Array


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def start(cfg: LMConfig, scfg: SparsityConfig, params: dict, prompts_bw: jax.Array, lengths_b: jax.Array,
          capacity: int, key: jax.Array) -> DecodeState:
    """Dense prefill of every prompt but its last token into a cache of ``capacity`` positions
    (with its page summaries under QUEST).

    ``prompts_bw [B, W]`` right-padded, ``lengths_b [B] >= 1``. The state is committed to its
    devices: an episode's output state is (whenever any input, such as a restored policy, is), and
    :func:`run_episode` compiles separately for committed and uncommitted inputs, so an uncommitted
    first state would compile every episode program twice.
    """
    state = _prefill_state(cfg, scfg, params, prompts_bw, lengths_b, capacity, key)
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), state)


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _prefill_state(cfg: LMConfig, scfg: SparsityConfig, params: dict, prompts_bw: jax.Array, lengths_b: jax.Array,
                   capacity: int, key: jax.Array) -> DecodeState:
    B = prompts_bw.shape[0]
    rows = jnp.arange(B)
    n = lengths_b - 1
    h, cache = lm.prefill(cfg, params, prompts_bw, n, capacity)
    h_prev = jnp.where((n > 0)[:, None], h[rows, jnp.maximum(n - 1, 0)], 0.0).astype(h.dtype)
    prev = jnp.where(n > 0, prompts_bw[rows, jnp.maximum(n - 1, 0)], 0)
    return DecodeState(cache=cache, h_prev=h_prev, token=prompts_bw[rows, n].astype(jnp.int32),
                       prev_token=prev.astype(jnp.int32), key=key, summaries=page_summaries_of(scfg, cache))


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "controller", "steps", "temperature", "top_p", "fast",
                                             "replay"), donate_argnames=("state",))
def run_episode(cfg: LMConfig, scfg: SparsityConfig, params: dict, controller: Controller, ctrl_params, targets_b3: jax.Array,
                state: DecodeState, forced_bt: jax.Array, force_bt: jax.Array, counted_b: jax.Array, *, steps: int,
                temperature: float = 0.0, top_p: float = 1.0, fast: FastPath | None = None,
                replay: bool = True) -> tuple[DecodeState, EpisodeOut]:
    """One episode of ``steps`` (T) controlled decode steps, then the dense replay of its inputs.

    ``targets_b3``: budget targets (token, prune, quant ratio) per row; ``forced_bt``/``force_bt
    [B, T]``: where ``force_bt`` is True the next token is ``forced_bt`` instead of a sample
    (teacher forcing). ``counted_b [B]``: how many of the T steps count (the rest produce nothing
    the caller keeps, run dense and are not effective). The caller keeps ``cache.lengths + T <=
    capacity``. ``fast``: run each step on the fast path (:mod:`soljax.lm.fast_step`). ``replay``:
    False skips the dense replay: the cache keeps the K/V entries the steps computed under their
    controls (the KV pollution the paper measures as small on average, SOL_REFERENCE_SPEC.md 13.8)
    and the next episode starts from the last step's hidden state.
    """
    B, T = state.token.shape[0], steps
    targets = targets_b3.astype(jnp.float32)
    prefix = shared_prefix_from_cache(scfg, state.cache, state.summaries)
    key, k_run = jax.random.split(state.key)
    rows = jnp.arange(B)
    start_carry = StepCarry.start(cfg, params, controller, ctrl_params, SuffixCache.empty(cfg, B, 1, T), state.h_prev,
                                  1, T)
    ts = jnp.arange(T)[:, None]
    effective_tb = (prefix.lengths[None] + ts + 1 > scfg.min_effective_kv) & (ts < counted_b[None])
    left_tb = steps_left(effective_tb)

    def step(c, t):
        carry, token, prev_token, k = c
        k_next, k_act, k_tok = jax.random.split(k, 3)
        carry, out = controlled_decode(cfg, scfg, params, prefix, controller, ctrl_params, carry, k_act, t=t, T=T,
                                       tokens_bk=token[:, None], prev_tokens_bk=prev_token[:, None],
                                       effective_bk=effective_tb[t][:, None], steps_left_bk=left_tb[t][:, None],
                                       targets_b3=targets, feed_effective=True, fast=fast)
        logits = out.logits[:, 0]
        nxt = jnp.where(force_bt[:, t], forced_bt[:, t], sample_token(logits, k_tok, temperature, top_p))
        logp = jax.nn.log_softmax(logits, axis=-1)[rows, nxt]
        record = (token, nxt, logp, jnp.argmax(logits, -1) == nxt, out.usage[:, 0], effective_tb[t],
                  out.actions[:, 0], out.info.attended[:, 0])
        return (carry, nxt.astype(jnp.int32), token, k_next), record

    (carry, token, prev_token, _), outs = jax.lax.scan(step, (start_carry, state.token, state.prev_token, k_run),
                                                       jnp.arange(T))
    out = EpisodeOut(*(jnp.moveaxis(a, 0, 1) for a in outs))
    if replay:
        replay_impl = "cpu" if scfg.attention_impl == "cpu" else "xla"  # the C++ kernel reads the cache in place
        h_last, cache = lm.extend(cfg, params, state.cache, out.inputs, attention_impl=replay_impl)  # dense replay
        h_last = h_last[:, -1]
    else:  # keep the episode's own entries [L, B, 1, T, ...]
        cache = lm.append(state.cache, carry.suffix.k[:, :, 0], carry.suffix.v[:, :, 0])
        h_last = carry.h_prev[:, 0]
    summaries = refresh_page_summaries_of(scfg, state.summaries, cache, prefix.lengths, T)
    return DecodeState(cache=cache, h_prev=h_last, token=token, prev_token=prev_token, key=key,
                       summaries=summaries), out
