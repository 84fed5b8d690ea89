"""Text generation and continuation scoring, dense or with a controller choosing per-token compute.

* :func:`generate`: plain dense decoding (the frozen LM alone), batched prompts of different
  lengths, greedy or temperature/top-p, EOS.
* :func:`controlled_generate`: decoding where a controller (the trained SOL policy, or any
  controller of :mod:`soljax.control.policy`) picks each token's compute, in episodes of the training
  horizon with dense replay between them (see :mod:`soljax.engine.episodes`); EOS and stop strings;
  per-token realized usage.
* :func:`score_continuations`: the same machinery teacher-forced: log p of given continuation
  tokens under controlled decoding (the lm_eval loglikelihood path).
* :func:`dense_logprobs`: log p of continuations under the dense LM (to compare continuations).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soljax.compress.actions import AXES
from soljax.compress.targets import as_targets
from soljax.distributions import sample_token
from soljax.engine.episodes import ControlledModel, EpisodeOut, round_up, run_episode, start
from soljax.errors import SoljaxError
from soljax.lm import model as lm
from soljax.lm.config import LMConfig

@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(cfg: LMConfig, params, tokens_bt, lengths_b, capacity: int, max_new: int,
              temperature: float, top_p: float, eos_ids, key):
    B = tokens_bt.shape[0]
    h, cache = lm.prefill(cfg, params, tokens_bt, lengths_b, capacity)
    last_h = h[jnp.arange(B), lengths_b - 1]
    first_logits = lm.logits(cfg, params, last_h)
    out = jnp.zeros((B, max_new), jnp.int32)
    done = jnp.zeros((B,), bool)
    num = jnp.zeros((B,), jnp.int32)

    def cond(state):
        t, _, _, done, _, _, _ = state
        return (t < max_new) & ~jnp.all(done)

    def body(state):
        t, cache, step_logits, done, num, out, key = state
        key, sub = jax.random.split(key)
        token = sample_token(step_logits, sub, temperature, top_p)
        out = out.at[:, t].set(jnp.where(done, 0, token))
        num = num + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        step_logits, _, cache = lm.decode_step(cfg, params, cache, token)
        return t + 1, cache, step_logits, done, num, out, key

    state = (jnp.int32(0), cache, first_logits, done, num, out, key)
    _, _, _, _, num, out, _ = jax.lax.while_loop(cond, body, state)
    return out, num


def generate(cfg: LMConfig, params, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: tuple[int, ...] = (), pad_to: int = 64) -> list[list[int]]:
    """Continues each prompt (token ids) by up to ``max_new_tokens`` tokens.

    Rows stop at an EOS id (included in the output). Prompts are right-padded to a multiple of
    ``pad_to`` so that nearby prompt lengths share one compiled program.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SoljaxError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise SoljaxError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise SoljaxError("temperature must be >= 0 and top_p in (0, 1]")
    longest = max(len(p) for p in prompts)
    width = -(-longest // pad_to) * pad_to
    capacity = width + max_new_tokens
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise SoljaxError(f"prompt plus new tokens ({longest + max_new_tokens}) exceed the model's "
                          f"context of {cfg.max_position_embeddings}")
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    out, num = _generate(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), capacity,
                         max_new_tokens, float(temperature), float(top_p), eos,
                         jax.random.PRNGKey(seed))
    out, num = np.asarray(out), np.asarray(num)
    return [out[i, : num[i]].tolist() for i in range(len(prompts))]


# ----------------------------------------------------------------------------------------------
# Controlled decoding: budgets, results


def realized_budget(usage_n3: np.ndarray, effective_n: np.ndarray) -> dict[str, float]:
    """Mean applied usage per axis over the effective steps (NaN when there is none)."""
    usage_n3, eff = np.asarray(usage_n3, np.float64).reshape(-1, 3), np.asarray(effective_n, bool).reshape(-1)
    mean = usage_n3[eff].mean(0) if eff.any() else np.full(3, np.nan)
    return {**dict(zip(AXES, map(float, mean))), "effective_steps": int(eff.sum())}


@dataclasses.dataclass
class Generation:
    """One prompt's controlled continuation, per emitted token ``[n]``: ``tokens``, ``logprobs``
    (log p under the controlled model), ``usage [n, 3]`` (applied nominal usage kappa, rho / rho_max,
    bits / 16 of the step that produced the token), ``effective``, ``actions`` (-1 for raw
    controls), ``attended`` (realized attended fraction); ``stop_reason`` (eos | stop | length);
    ``text`` (decoded, cut before a stop string; None without a decoder)."""

    tokens: list[int]
    logprobs: np.ndarray
    usage: np.ndarray
    effective: np.ndarray
    actions: np.ndarray
    attended: np.ndarray
    stop_reason: str
    text: str | None = None

    @property
    def budget(self) -> dict[str, float]:
        return realized_budget(self.usage, self.effective)


@dataclasses.dataclass
class ContinuationScore:
    """Teacher-forced scores of one continuation, per token ``[n]``: ``logprobs`` (log p of each
    continuation token under controlled decoding), ``greedy`` (it is the argmax), ``usage [n, 3]``,
    ``effective``, ``actions``."""

    logprobs: np.ndarray
    greedy: np.ndarray
    usage: np.ndarray
    effective: np.ndarray
    actions: np.ndarray

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def is_greedy(self) -> bool:
        return bool(self.greedy.all())

    @property
    def budget(self) -> dict[str, float]:
        return realized_budget(self.usage, self.effective)


# ----------------------------------------------------------------------------------------------
# Controlled decoding: the host loop over episodes


def _check_sequences(seqs, what: str) -> None:
    if not seqs or any(len(s) == 0 for s in seqs):
        raise SoljaxError(f"every {what} needs at least one token")


def _run(model: ControlledModel, prompts, targets, n_steps: int, forced_bn: np.ndarray | None, *,
         temperature: float, top_p: float, seed: int, pad_to: int, counted_b: np.ndarray | None = None,
         finished: Callable[[dict], bool] | None = None) -> dict[str, np.ndarray]:
    """Episodes until ``n_steps`` steps are done or ``finished(outputs so far)`` -> EpisodeOut fields
    as numpy ``[B, steps done]``. ``counted_b``: the steps each row keeps (default ``n_steps``); later
    steps are not effective, so budgets are spent on the kept ones only. A controller with a
    ``check_targets(targets [B, 3])`` method (the guarded policy) may refuse the targets first."""
    cfg, T = model.cfg, model.episode_len
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    if longest - 1 + n_steps > cfg.max_position_embeddings:
        raise SoljaxError(f"prompt plus new tokens ({longest - 1 + n_steps}) exceed the model's context "
                          f"of {cfg.max_position_embeddings}")
    n_ep = -(-n_steps // T)
    width = round_up(longest, pad_to)
    capacity = round_up(width + n_ep * T, pad_to)
    tokens = np.zeros((B, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    targets_b3 = as_targets(targets, B)
    check = getattr(model.controller, "check_targets", None)
    if check is not None:  # a guarded policy refuses targets it cannot cap
        check(targets_b3)
    ctrl_params = model.params_for(targets_b3)
    forced = np.zeros((B, n_ep * T), np.int32)
    force = np.zeros((B, n_ep * T), bool)
    if forced_bn is not None:
        forced[:, : forced_bn.shape[1]] = forced_bn
        force[:] = True
    state = start(cfg, model.scfg, model.params, jnp.asarray(tokens), jnp.asarray(lengths), capacity,
                  jax.random.PRNGKey(seed))
    counted = np.full(B, n_steps) if counted_b is None else np.asarray(counted_b)
    chunks: list[EpisodeOut] = []
    for e in range(n_ep):
        win = slice(e * T, (e + 1) * T)
        state, out = run_episode(cfg, model.scfg, model.params, model.controller, ctrl_params,
                                 jnp.asarray(targets_b3), state, jnp.asarray(forced[:, win]),
                                 jnp.asarray(force[:, win]), jnp.asarray(np.clip(counted - e * T, 0, T), jnp.int32),
                                 steps=T, temperature=float(temperature), top_p=float(top_p),
                                 fast=model.fast_for(B), replay=model.replay)
        chunks.append(jax.tree.map(np.asarray, out))
        done = {k: np.concatenate([getattr(c, k) for c in chunks], axis=1) for k in EpisodeOut._fields}
        if finished is not None and finished(done):
            break
    return done


def _stop_point(tokens: list[int], eos_ids, stop: Sequence[str], decode) -> tuple[int, str] | None:
    """Where a continuation ends: ``(number of tokens kept, reason)``, or None if it goes on."""
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), None)
    if stop and decode is not None:
        text = decode(tokens[:end])
        if any(s in text for s in stop):
            n = next(k for k in range(1, len(tokens) + 1) if any(s in decode(tokens[:k]) for s in stop))
            return n, "stop"
    return (end, "eos") if end is not None else None


def controlled_generate(model: ControlledModel, prompts: list[list[int]], max_new_tokens: int, targets, *,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                        eos_ids: Sequence[int] = (), stop: Sequence[str] = (),
                        decode: Callable[[list[int]], str] | None = None, pad_to: int = 64) -> list[Generation]:
    """Continues each prompt by up to ``max_new_tokens`` tokens with ``model.controller`` choosing
    every step's compute under budget ``targets`` ([3] or [B, 3]: token keep, prune keep, quant ratio).

    Episodes of ``model.episode_len`` steps with dense replay between them (:mod:`soljax.engine.episodes`);
    greedy when ``temperature == 0``, else temperature sampling within the top-p nucleus. A row
    stops at an EOS id (kept) or once its decoded text (``decode``) contains a stop string (the
    text is cut before it; the tokens end with the one that completed it). Decoding ends when every
    row has stopped (checked after each episode).

    Since a row may stop after any step, a controller with an ``open_ended()`` method decodes as
    the controller it returns: a guarded policy then keeps its caps after every step
    (:meth:`~soljax.control.PolicyController.open_ended`), so the realized usage of the tokens a
    row produced is at or below the targets on every axis however it stopped.
    """
    _check_sequences(prompts, "prompt")
    if max_new_tokens < 1:
        raise SoljaxError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise SoljaxError("temperature must be >= 0 and top_p in (0, 1]")
    if stop and decode is None:
        raise SoljaxError("stop strings need a decode function (token ids -> text)")
    open_ended = getattr(model.controller, "open_ended", None)
    if open_ended is not None:
        model = dataclasses.replace(model, controller=open_ended())
    eos = set(int(e) for e in eos_ids)
    ends: dict[int, tuple[int, str]] = {}

    def finished(out):
        for b in range(len(prompts)):
            if b not in ends:
                hit = _stop_point(out["next_tokens"][b, :max_new_tokens].tolist(), eos, stop, decode)
                if hit is not None:
                    ends[b] = hit
        return len(ends) == len(prompts)

    out = _run(model, prompts, targets, max_new_tokens, None, temperature=temperature, top_p=top_p, seed=seed,
               pad_to=pad_to, finished=finished)
    results = []
    for b in range(len(prompts)):
        n, reason = ends.get(b, (max_new_tokens, "length"))
        toks = out["next_tokens"][b, :n].tolist()
        text = None
        if decode is not None:
            text = decode(toks)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
        results.append(Generation(tokens=toks, logprobs=out["logprobs"][b, :n], usage=out["usage"][b, :n],
                                  effective=out["effective"][b, :n], actions=out["actions"][b, :n],
                                  attended=out["attended"][b, :n], stop_reason=reason, text=text))
    return results


def score_continuations(model: ControlledModel, contexts: list[list[int]], continuations: list[list[int]],
                        targets, *, seed: int = 0, pad_to: int = 64) -> list[ContinuationScore]:
    """Teacher-forced controlled scoring: log p of every continuation token given its context.

    Row b: dense prefill of ``contexts[b][:-1]``; then one controlled step per continuation token
    (inputs ``contexts[b][-1], continuations[b][0], ...``), each scoring the next continuation
    token, in episodes of ``model.episode_len`` with dense replay, budget tracking restarting per
    row (the reference's loglikelihood path). Rows are independent: batching changes nothing but
    speed. ``targets``: [3] or [B, 3]. Contexts longer than the model allows must be cut by the caller.
    The continuations' lengths are known, so a guarded policy keeps its episode-level caps here:
    each episode's counted steps, and so every continuation's, end at or below the targets.
    """
    _check_sequences(contexts, "context")
    _check_sequences(continuations, "continuation")
    if len(contexts) != len(continuations):
        raise SoljaxError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    n = max(len(c) for c in continuations)
    forced = np.zeros((len(contexts), n), np.int32)
    for i, c in enumerate(continuations):
        forced[i, : len(c)] = c
    out = _run(model, contexts, targets, n, forced, temperature=0.0, top_p=1.0, seed=seed, pad_to=pad_to,
               counted_b=np.array([len(c) for c in continuations]))
    return [ContinuationScore(logprobs=out["logprobs"][b, :len(c)], greedy=out["greedy"][b, :len(c)],
                              usage=out["usage"][b, :len(c)], effective=out["effective"][b, :len(c)],
                              actions=out["actions"][b, :len(c)]) for b, c in enumerate(continuations)]


@functools.partial(jax.jit, static_argnums=0)
def _dense_scores(cfg: LMConfig, params, tokens_bw, lengths_b, starts_b, labels_bc):
    h = lm.forward(cfg, params, tokens_bw, lengths_b)
    pos = starts_b[:, None] - 1 + jnp.arange(labels_bc.shape[1])[None, :]
    h = jnp.take_along_axis(h, jnp.clip(pos, 0, tokens_bw.shape[1] - 1)[..., None], axis=1)
    logp = jax.nn.log_softmax(lm.logits(cfg, params, h), axis=-1)
    return jnp.take_along_axis(logp, labels_bc[..., None], axis=-1)[..., 0]


def dense_logprobs(cfg: LMConfig, params, prompts: list[list[int]], continuations: list[list[int]], *,
                   pad_to: int = 64) -> list[np.ndarray]:
    """log p of each continuation token given its prompt under the dense LM, one array per row."""
    _check_sequences(prompts, "prompt")
    if len(prompts) != len(continuations):
        raise SoljaxError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    width = round_up(max(len(s) for s in seqs), pad_to)
    n = round_up(max(1, max(len(c) for c in continuations)), 8)
    tokens = np.zeros((len(seqs), width), np.int32)
    labels = np.zeros((len(seqs), n), np.int32)
    for i, (s, c) in enumerate(zip(seqs, continuations)):
        tokens[i, : len(s)] = s
        labels[i, : len(c)] = c
    out = np.asarray(_dense_scores(cfg, params, jnp.asarray(tokens), jnp.asarray([len(s) for s in seqs]),
                                   jnp.asarray([len(p) for p in prompts]), jnp.asarray(labels)))
    return [out[i, : len(c)] for i, c in enumerate(continuations)]


def _mean(a) -> float | None:
    return float(np.mean(a)) if len(a) else None


def _ms_per_token(run: Callable[[], object], count: Callable[[object], int]) -> float:
    """Wall milliseconds per generated token of ``run()`` (called after a warm-up call by the caller)."""
    t0 = time.perf_counter()
    out = run()
    return (time.perf_counter() - t0) * 1000.0 / max(1, count(out))


def policy_generation_report(model: ControlledModel, tokenizer, prompts: list[str], max_new_tokens: int,
                             targets, *, compare_dense: bool = False, temperature: float = 0.0,
                             top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] = (),
                             stop: Sequence[str] = ()) -> dict:
    """Controlled continuations of text prompts with their realized budgets (per sample and over all
    effective steps) and, with ``compare_dense``, the dense model's continuation next to each, with
    the mean dense log-probability of both continuations (the reference README's comparison), and
    both decoders' wall time per generated token, prefill included (``timing``; each measured on a
    second run, after a first one that compiles; ``path`` says whether the fast decode step served
    the prompts)."""
    if not prompts:
        raise SoljaxError("give at least one prompt")
    ids = [tokenizer.encode(p) for p in prompts]
    if any(not i for i in ids):
        raise SoljaxError("every prompt needs at least one token (empty prompt given)")
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    run_controlled = lambda: controlled_generate(model, ids, max_new_tokens, targets, temperature=temperature,  # noqa: E731
                                                 top_p=top_p, seed=seed, eos_ids=eos_ids, stop=stop, decode=decode)
    gens = run_controlled()
    samples = [{"prompt": p, "controlled": {"text": g.text, "tokens": len(g.tokens), "stop_reason": g.stop_reason,
                                            "budget": g.budget}} for p, g in zip(prompts, gens)]
    if compare_dense:
        run_dense = lambda: generate(model.cfg, model.params, ids, max_new_tokens, temperature=temperature,  # noqa: E731
                                     top_p=top_p, seed=seed, eos_ids=tuple(eos_ids))
        dense = run_dense()
        timing = {"path": "fast" if model.fast_for(len(ids)) is not None else "masked",
                  "controlled_ms_per_token": _ms_per_token(run_controlled, lambda g: sum(len(x.tokens) for x in g)),
                  "dense_ms_per_token": _ms_per_token(run_dense, lambda d: sum(len(x) for x in d))}
        timing["speedup"] = timing["dense_ms_per_token"] / timing["controlled_ms_per_token"]
        dense = [d[: (_stop_point(d, set(), stop, decode) or (len(d), ""))[0]] for d in dense]
        lp_ctrl = dense_logprobs(model.cfg, model.params, ids, [g.tokens for g in gens])
        lp_dense = dense_logprobs(model.cfg, model.params, ids, dense)
        for s, d, a, b in zip(samples, dense, lp_ctrl, lp_dense):
            text = decode(d)
            cut = min((text.find(x) for x in stop if x in text), default=-1)
            s["controlled"]["mean_dense_logprob"] = _mean(a)
            s["dense"] = {"text": text[:cut] if cut >= 0 else text, "tokens": len(d), "mean_dense_logprob": _mean(b)}
    report = {"targets": dict(zip(AXES, map(float, as_targets(targets, 1)[0]))), "episode_len": model.episode_len,
              "budget": realized_budget(np.concatenate([g.usage for g in gens]),
                                        np.concatenate([g.effective for g in gens])),
              "samples": samples}
    if compare_dense:
        report["timing"] = timing
    return report


def budget_line(b: dict) -> str:
    """One line of realized usage per axis (a :func:`realized_budget` dict)."""
    if not b["effective_steps"]:
        return "no compressible step"
    return (f"token keep {b['token']:.3f}, prune keep {b['prune']:.3f}, quant ratio {b['quant']:.3f} "
            f"({16 * b['quant']:.1f} bits) over {b['effective_steps']} steps")


def format_generation_report(report: dict, name: str = "policy") -> str:
    """The text ``soljax generate --policy`` prints for a :func:`policy_generation_report`."""
    lines = []
    for s in report["samples"]:
        c = s["controlled"]
        lines += [f"[{name}] {s['prompt']}{c['text']}", f"  realized: {budget_line(c['budget'])}"]
        if "dense" in s:
            lines += [f"  mean dense log-prob {c['mean_dense_logprob']:.3f}", f"[dense] {s['prompt']}{s['dense']['text']}",
                      f"  mean dense log-prob {s['dense']['mean_dense_logprob']:.3f}"]
        lines.append("")
    if "timing" in report:
        tm = report["timing"]
        lines.append(f"time per token: controlled {tm['controlled_ms_per_token']:.1f} ms ({tm['path']} path), dense "
                     f"{tm['dense_ms_per_token']:.1f} ms: {tm['speedup']:.2f}x (prefill included, after a warm-up run)")
    t = report["targets"]
    lines.append(f"targets: token keep {t['token']:.3f}, prune keep {t['prune']:.3f}, quant ratio {t['quant']:.3f}; "
                 f"realized: {budget_line(report['budget'])} (episodes of {report['episode_len']})")
    return "\n".join(lines)
