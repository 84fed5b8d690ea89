"""Categorical distributions given by logits over the last axis: KL, entropy, log-probabilities,
sampling (greedy, temperature, top-p). Used by the engine (dense KL, token sampling), the
controllers (action sampling) and the objective (PPO terms)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def kl_categorical(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """``KL(p || q)`` over the last axis of two logit arrays (computed from log-softmax, float32).

    Entries where p has zero probability (``-inf`` logits) contribute 0.
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits_p, jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(jnp.asarray(logits_q, jnp.float32), axis=-1)
    p = jnp.exp(logp)
    diff = jnp.where(p > 0, logp - logq, 0.0)
    return jnp.sum(p * diff, axis=-1)


@jax.jit
def entropy_categorical(logits: jax.Array) -> jax.Array:
    """Entropy of the softmax of ``logits`` over the last axis (float32)."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def log_prob(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """``log softmax(logits)[..., actions]``: shape ``logits.shape[:-1]``."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    idx = jnp.asarray(actions, jnp.int32)[..., None]
    return jnp.take_along_axis(logp, idx, axis=-1)[..., 0]


def sample(logits: jax.Array, key: jax.Array) -> jax.Array:
    """One id per row, drawn from ``softmax(logits)`` (int32, shape ``logits.shape[:-1]``)."""
    return jax.random.categorical(key, jnp.asarray(logits, jnp.float32), axis=-1).astype(jnp.int32)


def greedy(logits: jax.Array) -> jax.Array:
    """The argmax id per row (int32)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_token(logits_bv: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when ``temperature == 0``; otherwise temperature sampling within the top-p nucleus."""
    if temperature == 0.0:
        return greedy(logits_bv)
    scaled = logits_bv / temperature
    if top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        outside = jnp.cumsum(probs, axis=-1) - probs > top_p  # the first token always stays
        sorted_logits = jnp.where(outside, -jnp.inf, sorted_logits)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


__all__ = ["entropy_categorical", "greedy", "kl_categorical", "log_prob", "sample", "sample_token"]
