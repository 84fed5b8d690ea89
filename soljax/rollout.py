"""Teacher-forced counterfactual rollouts: one dense prefill per block, K schedules over T steps.

For each block of ``M + T + 1`` tokens, the first M are prefilled densely once (shared prefix);
then, for t = 0..T-1, every schedule feeds token ``M + t`` under its own controls and is scored on
token ``M + t + 1``. All B x K rows run in one ``lax.scan`` over t inside one compiled call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from soljax.lm.config import LMConfig
from soljax.lm.controlled import Controls, SparsityConfig, SuffixCache, controlled_step, prefill_shared


class ScheduleScores(NamedTuple):
    """Per ``[B, K, T]``: log p of the true token, realized attended fraction, effective flag;
    ``kept_keys [B, K, T, L, Hq]``: keys attended per layer and query head; ``hidden [B, K, T, D]``:
    final-norm hidden state after each step; ``h0 [B, D]``: after the prefill."""

    logprobs: jax.Array
    attended: jax.Array
    effective: jax.Array
    kept_keys: jax.Array
    hidden: jax.Array
    h0: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def run_schedules(cfg: LMConfig, scfg: SparsityConfig, params: dict, blocks: jax.Array, kappa: jax.Array,
                  rho: jax.Array, bits: jax.Array, context_len: int) -> ScheduleScores:
    """Scores K fixed compute schedules on every block.

    ``blocks [B, M + T + 1]`` token ids; ``kappa``/``rho``/``bits`` ``[B, K, T]`` (or ``[K, T]``,
    shared by all blocks); ``context_len = M``.
    """
    B, N = blocks.shape
    M = context_len
    T = N - M - 1
    if T < 1:
        raise ValueError(f"blocks of {N} tokens leave no step after a context of {M}")
    kappa, rho, bits = (jnp.broadcast_to(a, (B,) + a.shape[-2:]) for a in (kappa, rho, bits))
    K = kappa.shape[1]
    h0, prefix = prefill_shared(cfg, scfg, params, blocks[:, :M], jnp.full((B,), M, jnp.int32))
    suffix = SuffixCache.empty(cfg, B, K, T)

    def step(suffix, t):
        tokens = jnp.broadcast_to(blocks[:, M + t][:, None], (B, K))
        controls = Controls(kappa=kappa[:, :, t], rho=rho[:, :, t], bits=bits[:, :, t])
        logits, h, suffix, info = controlled_step(cfg, scfg, params, prefix, suffix, tokens, controls)
        logp = jax.nn.log_softmax(logits, axis=-1)
        label = blocks[:, M + t + 1]
        lp = jnp.take_along_axis(logp, jnp.broadcast_to(label[:, None, None], (B, K, 1)), axis=-1)[..., 0]
        return suffix, (lp, info.attended, info.effective, info.kept_keys, h)

    _, (lp, attended, effective, kept, hidden) = jax.lax.scan(step, suffix, jnp.arange(T))
    move = lambda a: jnp.moveaxis(a, 0, 2)  # noqa: E731  [T, B, K, ...] -> [B, K, T, ...]
    return ScheduleScores(logprobs=move(lp), attended=move(attended), effective=move(effective),
                          kept_keys=move(kept), hidden=move(hidden), h0=h0)


def nominal_usage(kappa: jax.Array, rho: jax.Array, bits: jax.Array, effective: jax.Array,
                  rho_max: float = 1.0) -> dict[str, jax.Array]:
    """Episode-mean nominal usage per axis over effective steps (arrays ``[..., T]`` -> ``[...]``).

    Token usage is kappa, prune usage rho / rho_max and quant usage bits / 16, as the budget
    accounting charges them; steps that ran dense (not effective) are left out.
    """
    eff = effective.astype(jnp.float32)
    n = jnp.maximum(eff.sum(-1), 1.0)
    mean = lambda a: (a.astype(jnp.float32) * eff).sum(-1) / n  # noqa: E731
    return {"token": mean(kappa), "prune": mean(rho) / rho_max, "quant": mean(bits) / 16.0}
