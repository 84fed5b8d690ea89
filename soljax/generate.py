"""Dense text generation: batched prompts of different lengths, greedy or temperature/top-p."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from soljax.errors import SoljaxError
from soljax.lm import model as lm
from soljax.lm.config import LMConfig


def sample_token(logits_bv: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when ``temperature == 0``; otherwise temperature sampling within the top-p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
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
