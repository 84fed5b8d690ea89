"""Numerical building blocks of the LM: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from soljax.lm.config import LMConfig

NEG_INF = -jnp.inf


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; statistics in fp32, scale applied in the input dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_inv_freq(cfg: LMConfig) -> np.ndarray:
    """Inverse RoPE frequencies ``[head_dim // 2]`` (float32), with the configured scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE on ``[B, T, H, Dh]`` at integer positions ``[B, T]``."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    cos, sin = jnp.cos(angles).astype(x_bthd.dtype), jnp.sin(angles).astype(x_bthd.dtype)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin


def project_qkv(lp: dict, x_btd: jax.Array, positions_bt: jax.Array, cfg: LMConfig, inv_freq):
    """Query/key/value projections of one layer, after qk-norm and RoPE.

    Returns ``q [B, T, Hq, Dh]``, ``k [B, T, Hkv, Dh]``, ``v [B, T, Hkv, Dh]``.
    """
    q = jnp.einsum("btd,dhk->bthk", x_btd, lp["wq"])
    k = jnp.einsum("btd,dhk->bthk", x_btd, lp["wk"])
    v = jnp.einsum("btd,dhk->bthk", x_btd, lp["wv"])
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq), v


def output_proj(lp: dict, attn_bthk: jax.Array, cfg: LMConfig) -> jax.Array:
    out = jnp.einsum("bthk,hkd->btd", attn_bthk, lp["wo"])
    return out + lp["bo"] if cfg.o_bias else out


def mlp(lp: dict, x_btd: jax.Array) -> jax.Array:
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""
    gate = jnp.einsum("btd,df->btf", x_btd, lp["w_gate"])
    up = jnp.einsum("btd,df->btf", x_btd, lp["w_up"])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, lp["w_down"])


def grouped_logits(q_bthk: jax.Array, k_bshk: jax.Array) -> jax.Array:
    """Scaled attention logits ``[B, Hkv, G, T, S]`` in fp32; query heads grouped over KV heads."""
    B, T, Hq, Dh = q_bthk.shape
    Hkv = k_bshk.shape[2]
    q = q_bthk.reshape(B, T, Hkv, Hq // Hkv, Dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bshk, preferred_element_type=jnp.float32)
    return logits * (1.0 / math.sqrt(Dh))


def grouped_values(probs_bkgts: jax.Array, v_bshk: jax.Array) -> jax.Array:
    """Attention output ``[B, T, Hq, Dh]`` from probabilities ``[B, Hkv, G, T, S]``."""
    B, Hkv, G, T, _ = probs_bkgts.shape
    out = jnp.einsum("bkgts,bskd->btkgd", probs_bkgts.astype(v_bshk.dtype), v_bshk)
    return out.reshape(B, T, Hkv * G, v_bshk.shape[-1])


def block_diagonal_attention(q_bhk: jax.Array, parts, mask_value: float) -> jax.Array:
    """Attention of one query per row over several sets of keys at once (one softmax over all).

    ``q [B, Hq, Dh]``; ``parts``: ``(k [B, S, Hkv, Dh], v [B, S, Hkv, Dh], mask)`` per key set,
    ``mask`` (bool) broadcastable to ``[B, S, Hq]`` (query head ``h * G + g`` reads KV head h);
    masked logits are set to ``mask_value`` -> ``[B, Hq, Dh]``. Keys and values are read in their
    stored layout, as ``[B, S, Hkv * Dh]`` rows: the logits of every query head come from one
    matmul with a block-diagonal query matrix (KV head h's queries in block h, zeros elsewhere)
    and the output from one matmul of the probabilities with the value rows, of which the diagonal
    blocks are kept. Grouped einsums (:func:`grouped_logits`) would first move each layer's keys
    and values head-major, on CPU a copy of the whole cache per decoded token; this form reads them
    once, for Hkv times the (few) multiply-adds. Softmax in float32; the output has q's dtype.
    """
    B, Hq, Dh = q_bhk.shape
    Hkv = parts[0][0].shape[2]
    G = Hq // Hkv
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(Dh)
    q_blocks = jnp.einsum("bhgd,hj->bhdjg", q_bhk.reshape(B, Hkv, G, Dh),
                          jnp.eye(Hkv, dtype=q_bhk.dtype)).reshape(B, Hkv * Dh, Hq)
    rows = [(k.reshape(B, k.shape[1], Hkv * Dh), v.reshape(B, v.shape[1], Hkv * Dh)) for k, v, _ in parts]
    logits = [jnp.where(mask, jnp.einsum("bsc,bcn->bsn", k, q_blocks, preferred_element_type=f32) * scale,
                        mask_value) for (k, _), (_, _, mask) in zip(rows, parts)]  # [B, S, Hq] each
    top = functools.reduce(jnp.maximum, [lg.max(axis=1) for lg in logits])  # [B, Hq]
    probs = [jnp.exp(lg - top[:, None]) for lg in logits]
    blocks = sum(jnp.einsum("bsn,bsc->bnc", p.astype(v.dtype), v, preferred_element_type=f32)
                 for p, (_, v) in zip(probs, rows))
    out = jnp.einsum("bhghd->bhgd", blocks.reshape(B, Hkv, G, Hkv, Dh))
    out = out / sum(p.sum(axis=1) for p in probs).reshape(B, Hkv, G, 1)
    return out.reshape(B, Hq, Dh).astype(q_bhk.dtype)


def one_query_attention(q_bhk: jax.Array, k_new_bhk: jax.Array, v_new_bhk: jax.Array, k_bshk: jax.Array,
                        v_bshk: jax.Array, valid_bs: jax.Array, own_valid_b: jax.Array,
                        mask_value: float) -> jax.Array:
    """Decode attention: one new query per row over its cached keys ``k``/``v [B, S, Hkv, Dh]``
    (where ``valid_bs``) and its own key ``k_new``/``v_new [B, Hkv, Dh]`` (where ``own_valid_b``),
    by :func:`block_diagonal_attention` (the cache is never moved) -> ``[B, Hq, Dh]``."""
    parts = [(k_bshk, v_bshk, valid_bs[..., None]),
             (k_new_bhk[:, None], v_new_bhk[:, None], own_valid_b[:, None, None])]
    return block_diagonal_attention(q_bhk, parts, mask_value)


def causal_self_attention(q_bthk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, lengths_b: jax.Array,
                          mask_value: float, chunk: int = 256) -> jax.Array:
    """Causal attention of T new tokens over themselves, query chunk by query chunk.

    Heads are moved in front (``[B, Hkv, G*T, Dh]``) so each chunk is one batched matmul, and query
    chunk ``[t0, t1)`` only reads keys ``[0, t1)``: the upper triangle of the score matrix is never
    computed. Keys at positions ``>= lengths_b[b]`` are masked. Returns ``[B, T, Hq, Dh]``.
    """
    B, T, Hq, Dh = q_bthk.shape
    Hkv = k_bshk.shape[2]
    G = Hq // Hkv
    qh = q_bthk.reshape(B, T, Hkv, G, Dh).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
    kh = k_bshk.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]
    vh = v_bshk.transpose(0, 2, 1, 3)
    scale = 1.0 / math.sqrt(Dh)
    key_valid = jnp.arange(T)[None, :] < lengths_b[:, None]  # [B, T]
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        C = t1 - t0
        qc = qh[:, :, :, t0:t1].reshape(B, Hkv, G * C, Dh)
        logits = jnp.einsum("bkqd,bksd->bkqs", qc, kh[:, :, :t1], preferred_element_type=jnp.float32)
        logits = logits.reshape(B, Hkv, G, C, t1) * scale
        causal = jnp.arange(t1)[None, :] <= jnp.arange(t0, t1)[:, None]  # [C, t1]
        mask = causal[None] & key_valid[:, None, :t1]  # [B, C, t1]
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, mask_value), axis=-1)
        out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(B, Hkv, G * C, t1).astype(vh.dtype), vh[:, :, :t1])
        outs.append(out.reshape(B, Hkv, G, C, Dh))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, Dh)
