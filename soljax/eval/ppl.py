"""Dense perplexity of token sequences, scored in consecutive non-overlapping windows."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from soljax.errors import SoljaxError
from soljax.lm import model as lm
from soljax.lm.config import LMConfig


@functools.partial(jax.jit, static_argnums=0)
def window_nll(cfg: LMConfig, params: dict, tokens_bt: jax.Array, lengths_b: jax.Array):
    """Summed next-token NLL and scored-token count per window ``[B]``.

    Position 0 of each window is context only; position i (1 <= i < length) is scored given the
    tokens before it in the same window.
    """
    h = lm.forward(cfg, params, tokens_bt, lengths_b)
    logp = jax.nn.log_softmax(lm.logits(cfg, params, h[:, :-1]), axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    scored = jnp.arange(1, tokens_bt.shape[1])[None, :] < lengths_b[:, None]
    return -jnp.sum(jnp.where(scored, target_logp, 0.0), axis=1), scored.sum(axis=1)


def windows(ids: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts ``ids`` into windows ``[N, window]`` (last one right-padded) and their lengths ``[N]``.

    A trailing window with a single token scores nothing and is dropped.
    """
    if window < 2:
        raise SoljaxError(f"--window must be at least 2, got {window}")
    ids = np.asarray(ids, np.int32)
    n = math.ceil(len(ids) / window)
    padded = np.zeros(n * window, np.int32)
    padded[: len(ids)] = ids
    lengths = np.minimum(window, len(ids) - window * np.arange(n)).astype(np.int32)
    keep = lengths >= 2
    return padded.reshape(n, window)[keep], lengths[keep]


def perplexity(cfg: LMConfig, params: dict, ids, window: int = 1024, batch_tokens: int = 4096,
               progress=None) -> dict:
    """``{"tokens", "mean_nll", "ppl"}`` of one token sequence scored in windows of ``window``."""
    cfg.check_length(window, "--window")
    toks, lens = windows(ids, window)
    if len(toks) == 0:
        raise SoljaxError("the text is too short to score (needs at least 2 tokens)")
    batch = max(1, min(len(toks), batch_tokens // window))
    total, count = 0.0, 0
    for start in range(0, len(toks), batch):
        chunk_t, chunk_l = toks[start:start + batch], lens[start:start + batch]
        pad = batch - len(chunk_t)  # keep one compiled shape; padded rows score nothing
        chunk_t = np.pad(chunk_t, ((0, pad), (0, 0)))
        chunk_l = np.pad(chunk_l, (0, pad))
        nll, n = window_nll(cfg, params, jnp.asarray(chunk_t), jnp.asarray(chunk_l))
        total += float(np.sum(np.asarray(nll, np.float64)))
        count += int(jnp.sum(n))
        if progress is not None:
            progress(len(chunk_t) - pad)
    mean = total / count
    return {"tokens": count, "mean_nll": mean, "ppl": math.exp(mean)}
