"""Controlled decoding in episodes with dense replay: the engine behind policy generation and scoring.

Serving mirrors training. A batch of prompts (right-padded, per-row lengths) is prefilled densely
*except each prompt's last token*, which becomes the first controlled input (the reference
runtime's convention, SOL_REFERENCE_SPEC.md section 10). Decoding then runs in **episodes** of T
steps, T being the policy's training horizon:

* at an episode start the dense KV cache (prompt plus every finished episode) is wrapped as the
  episode's :class:`~soljax.lm.controlled.SharedPrefix` (with QUEST page summaries), exactly like a
  training block's context, and the controller starts a fresh episode (BOS previous action, zero
  running budget sums, fresh policy cache);
* each step feeds one token per row through :func:`~soljax.lm.controlled.controlled_step` with the
  controls the controller chose from the same observation as in training
  (:class:`soljax.rollout.Observation`); its K/V entries go to the episode's suffix cache;
* the next input is either sampled from the step's logits (generation) or forced (teacher-forced
  scoring);
* at the episode end the episode's inputs are **replayed densely** into the dense cache
  (:func:`soljax.lm.model.extend`), replacing the compressed ("polluted") K/V entries, and the next
  episode's ``h_prev`` is the last hidden state of that replay.

:func:`run_episode` is one compiled program per (batch, cache capacity, controller): the T steps
are a ``lax.scan`` whose carry holds the suffix cache, and the dense cache is donated, so it is
updated in place. The host calls it once per episode (checking EOS and stop strings in between).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soljax.errors import SoljaxError
from soljax.lm import model as lm
from soljax.lm.config import LMConfig
from soljax.lm.controlled import SparsityConfig, SuffixCache, controlled_step, shared_prefix_from_cache
from soljax.rollout import Observation, applied_usage, step_scalars, steps_left


@dataclasses.dataclass(frozen=True, eq=False)
class ControlledModel:
    """The frozen LM plus whoever chooses its per-token compute.

    ``controller``: any controller of :mod:`soljax.controllers` (static, hashable);
    ``ctrl_params``: its arrays, or a function ``(targets [B, 3] numpy) -> ctrl_params`` for
    controllers whose arrays depend on the batch (a budget-matched fixed schedule, raw
    ``[B, 1, T]`` controls); ``episode_len``: T, the horizon between dense replays (the policy's
    training ``rollout_len``).
    """

    cfg: LMConfig
    params: dict
    scfg: SparsityConfig
    controller: Any
    ctrl_params: Any
    episode_len: int

    def __post_init__(self):
        T = self.episode_len
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise SoljaxError(f"episode_len must be a positive integer, got {T!r}")

    def params_for(self, targets_b3: np.ndarray):
        """The controller's arrays for a batch with these targets."""
        return self.ctrl_params(targets_b3) if callable(self.ctrl_params) else self.ctrl_params

    @classmethod
    def from_run(cls, cfg: LMConfig, params: dict, run_dir: str | Path, *, step: int | None = None,
                 controller: str = "policy", greedy: bool = True, guard: bool = False) -> "ControlledModel":
        """The controlled model of a training run on an already loaded LM: its policy
        (``controller="policy"``, greedy or sampled actions; ``guard``: the targets are hard caps, see
        :class:`~soljax.controllers.PolicyController`) or the budget-matched fixed schedule over its
        action grid (``controller="fixed"``), with the run's sparsity settings and horizon."""
        from soljax.baselines import fixed_schedule
        from soljax.controllers import GivenActions, PolicyController
        from soljax.train import action_grid, policy_config, sparsity_config
        from soljax.train_io import load_policy

        if controller not in ("policy", "fixed"):
            raise SoljaxError(f"unknown controller {controller!r} for a training run (expected policy or fixed)")
        if guard and controller != "policy":
            raise SoljaxError("the budget guard applies to the policy controller only")
        run_config(run_dir)
        tcfg, variables = load_policy(run_dir, step)
        grid, T, scfg = action_grid(tcfg), tcfg.rollout_len, sparsity_config(tcfg)
        if controller == "fixed":
            return cls(cfg, params, scfg, GivenActions(grid=grid),
                       lambda targets: jnp.asarray(fixed_schedule(grid, targets, T)), T)
        pcfg = policy_config(tcfg)
        want = 2 * cfg.hidden_size + pcfg.scalar_hidden + pcfg.action_dim
        got = variables["params"]["in_proj"]["kernel"].shape[0]
        if got != want:
            raise SoljaxError(f"the policy in {run_dir} was trained on an LM of another width (input size "
                              f"{got}, this LM needs {want}): use the run's model")
        policy = PolicyController(grid=grid, policy=pcfg, greedy=greedy, guard=guard)
        return cls(cfg, params, scfg, policy, variables, T)


def run_config(run_dir: str | Path):
    """The :class:`~soljax.config.TrainConfig` saved in a training run directory."""
    import yaml

    from soljax.config import TrainConfig

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SoljaxError(f"no such training run directory: {run_dir}")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise SoljaxError(f"{run_dir} is not a soljax training run (no config.yaml)")
    return TrainConfig.from_dict(yaml.safe_load(saved.read_text()) or {})


def load_controlled(run_dir: str | Path, *, model_dir: str | Path | None = None, dtype: str | None = None,
                    step: int | None = None, controller: str = "policy", greedy: bool = True, guard: bool = False):
    """``(ControlledModel, tokenizer)`` of a training run: its LM (``model_dir``, default the run's
    own model) and its policy or fixed baseline (see :meth:`ControlledModel.from_run`)."""
    from soljax.lm.checkpoint import load_model

    tcfg = run_config(run_dir)
    if model_dir is None:
        model_dir = tcfg.model
        if model_dir == "embedded":
            from soljax.embedded import ensure_embedded_model

            model_dir = ensure_embedded_model()
    if not Path(model_dir).is_dir():
        raise SoljaxError(f"model directory not found: {model_dir} (pass --model DIR)")
    cfg, params, tok = load_model(Path(model_dir), dtype=dtype or tcfg.dtype)
    return ControlledModel.from_run(cfg, params, run_dir, step=step, controller=controller, greedy=greedy,
                                   guard=guard), tok


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What carries over from one episode to the next, per row.

    ``cache``: the dense KV cache ``[L, B, S, Hkv, Dh]`` (prompt minus its last token, then every
    finished episode replayed densely); ``h_prev [B, D]``: final-norm hidden state of the last
    dense position (zeros when nothing precedes); ``token [B]``: the next input;
    ``prev_token [B]``: the input before it; ``key``: the sampling key.
    """

    cache: lm.KVCache
    h_prev: jax.Array
    token: jax.Array
    prev_token: jax.Array
    key: jax.Array


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


@functools.partial(jax.jit, static_argnums=(0, 4))
def start(cfg: LMConfig, params: dict, prompts_bw: jax.Array, lengths_b: jax.Array, capacity: int,
          key: jax.Array) -> DecodeState:
    """Dense prefill of every prompt but its last token into a cache of ``capacity`` positions.

    ``prompts_bw [B, W]`` right-padded, ``lengths_b [B] >= 1``.
    """
    B = prompts_bw.shape[0]
    rows = jnp.arange(B)
    n = lengths_b - 1
    h, cache = lm.prefill(cfg, params, prompts_bw, n, capacity)
    h_prev = jnp.where((n > 0)[:, None], h[rows, jnp.maximum(n - 1, 0)], 0.0).astype(h.dtype)
    prev = jnp.where(n > 0, prompts_bw[rows, jnp.maximum(n - 1, 0)], 0)
    return DecodeState(cache=cache, h_prev=h_prev, token=prompts_bw[rows, n].astype(jnp.int32),
                       prev_token=prev.astype(jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "controller", "steps", "temperature", "top_p"),
                   donate_argnames=("state",))
def run_episode(cfg: LMConfig, scfg: SparsityConfig, params: dict, controller, ctrl_params, targets_b3: jax.Array,
                state: DecodeState, forced_bt: jax.Array, force_bt: jax.Array, counted_b: jax.Array, *, steps: int,
                temperature: float = 0.0, top_p: float = 1.0) -> tuple[DecodeState, EpisodeOut]:
    """One episode of ``steps`` (T) controlled decode steps, then the dense replay of its inputs.

    ``targets_b3``: budget targets (token, prune, quant ratio) per row; ``forced_bt``/``force_bt
    [B, T]``: where ``force_bt`` is True the next token is ``forced_bt`` instead of a sample
    (teacher forcing). ``counted_b [B]``: how many of the T steps count (the rest produce nothing
    the caller keeps, run dense and are not effective). The caller keeps ``cache.lengths + T <=
    capacity``.
    """
    from soljax.generate import sample_token

    B, T = state.token.shape[0], steps
    targets = targets_b3.astype(jnp.float32)
    prefix = shared_prefix_from_cache(scfg, state.cache)
    signals = getattr(controller, "needs_lm_signals", False)
    key, k_run = jax.random.split(state.key)
    rows = jnp.arange(B)
    carry = dict(suffix=SuffixCache.empty(cfg, B, 1, T), h_prev=state.h_prev[:, None], token=state.token,
                 prev_token=state.prev_token, prev_action=jnp.full((B, 1), controller.bos_id, jnp.int32),
                 usage_sum=jnp.zeros((B, 1, 3), jnp.float32), eff_count=jnp.zeros((B, 1), jnp.float32),
                 ctrl=controller.init(ctrl_params, B, 1, T), key=k_run)
    if signals:
        carry["logits"] = lm.logits(cfg, params, state.h_prev)
    ts = jnp.arange(T)[:, None]
    effective_tb = (prefix.lengths[None] + ts + 1 > scfg.min_effective_kv) & (ts < counted_b[None])
    left_tb = steps_left(effective_tb)

    def step(c, t):
        tokens = c["token"][:, None]
        effective = effective_tb[t][:, None]
        obs = Observation(h_prev=c["h_prev"], tokens=tokens, tok_emb=lm.embed(params, tokens),
                          scalars=step_scalars(t, T, effective, targets, c["usage_sum"], c["eff_count"]),
                          prev_action=c["prev_action"], t=t, steps_left=left_tb[t][:, None])
        if signals:
            from soljax.rollout import lm_signals

            ent, margin = lm_signals(c["logits"])
            obs = obs._replace(lm_entropy=ent[:, None], lm_margin=margin[:, None],
                               prev_tok_emb=lm.embed(params, c["prev_token"][:, None]))
        k_next, k_act, k_tok = jax.random.split(c["key"], 3)
        controls, actions, _, ctrl = controller.act(ctrl_params, c["ctrl"], obs, targets, k_act)
        logits, h, suffix, info = controlled_step(cfg, scfg, params, prefix, c["suffix"], tokens, controls)
        logits = logits[:, 0]
        nxt = jnp.where(force_bt[:, t], forced_bt[:, t], sample_token(logits, k_tok, temperature, top_p))
        logp = jax.nn.log_softmax(logits, axis=-1)[rows, nxt]
        usage = applied_usage(controls, effective, controller.rho_max)  # [B, 1, 3]
        eff = effective.astype(jnp.float32)
        new = dict(suffix=suffix, h_prev=h, token=nxt.astype(jnp.int32), prev_token=c["token"],
                   prev_action=jnp.where(effective, actions, controller.dense_id).astype(jnp.int32),
                   usage_sum=c["usage_sum"] + usage * eff[..., None], eff_count=c["eff_count"] + eff,
                   ctrl=ctrl, key=k_next)
        if signals:
            new["logits"] = logits
        out = (c["token"], nxt, logp, jnp.argmax(logits, -1) == nxt, usage[:, 0], effective[:, 0],
               actions[:, 0], info.attended[:, 0])
        return new, out

    c, outs = jax.lax.scan(step, carry, jnp.arange(T))
    out = EpisodeOut(*(jnp.moveaxis(a, 0, 1) for a in outs))
    h_replay, cache = lm.extend(cfg, params, state.cache, out.inputs)  # dense replay of the episode
    new_state = DecodeState(cache=cache, h_prev=h_replay[:, -1], token=c["token"], prev_token=c["prev_token"],
                            key=key)
    return new_state, out
