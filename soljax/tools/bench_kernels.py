"""``soljax bench kernels``: time and bytes of dense vs sparse decode attention and MLP.

Attention: one decode query per row over a ``context``-key cache (Llama-3-8B-like heads: 32 query
heads over 8 KV heads, head_dim 128, QUEST pages of 16). A sparse row times the whole sparse decode:
QUEST page scores from the page summaries (per-page key max/min), top-``ceil(keep * pages)``
selection per KV head, and attention over only those pages. The dense row of the same ``impl``
(``keep`` 1.0) is its baseline: XLA's dense attention over every key, or the Pallas kernel with
every page selected.

MLP: the gate and up projections of one decode step (``[batch, 4096] x [4096, 14336]``) with each
row's input pruned to its top ``keep`` channels by magnitude; the sparse op reads only the weight
rows of channels some row keeps (at batch > 1 their union, so random inputs leave little to skip).

``bytes`` is what the op must read: KV pages (+ page summaries for sparse attention) or weight
rows. ``ideal_speedup`` is dense bytes / sparse bytes and ``speedup`` dense seconds / sparse
seconds (same impl); their ratio is the achieved fraction of the ideal.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from soljax.compress.attention import page_summaries, quest_scores
from soljax.compress.prune import prune_mask
from soljax.kernels import ops
from soljax.kernels.sparse_mlp import union_channels

ATTN_HEADS = (32, 8, 128)  # query heads, KV heads, head_dim
PAGE_SIZE = 16
MLP_DIMS = (4096, 14336)


def _seconds(fn, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _dense_attention(q, k, v):
    """XLA dense decode attention: ``q [B, Hq, Dh]`` over every key of ``k``/``v [B, S, Hkv, Dh]``."""
    B, Hq, Dh = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Hkv, Hq // Hkv, Dh)
    s = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(Dh)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhgs,bshd->bhgd", p.astype(v.dtype), v).reshape(B, Hq, Dh)


def _sparse_attention(q, k, v, kmax, kmin, page_valid, prefix_len, *, num_pages: int, impl: str, select: bool):
    """Sparse decode (QUEST scoring + per-KV-head top-k + page-sparse attention) through ``ops``."""
    B, Hq, Dh = q.shape
    P, Hkv = kmax.shape[1], kmax.shape[2]
    G = Hq // Hkv
    if select:
        scores = quest_scores(q, kmax, kmin, page_valid).reshape(B, Hkv, G, P).max(axis=2)
        pages = jnp.sort(jax.lax.top_k(scores, num_pages)[1], axis=-1).astype(jnp.int32)
    else:  # every page, in order (the kernel's dense baseline)
        pages = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, Hkv, P))
    pages = pages[:, None]  # [B, 1, Hkv, NP]
    num = jnp.full((B, 1, Hkv), num_pages, jnp.int32)
    heads = jnp.full(pages.shape, (1 << G) - 1, jnp.int32)
    # the current token's key/value is the one-entry suffix; the context is the shared prefix
    ks, vs = k[:, -1:][:, None], v[:, -1:][:, None]
    out = ops.quest_decode_attention(q[:, None], k, v, prefix_len, ks, vs, jnp.ones((B, 1, Hq, 1), bool),
                                     pages, num, heads, page_size=PAGE_SIZE, impl=impl)
    return out[:, 0]


def bench_attention(context: int, batch: int, keeps, impls, dtype, repeats: int, rng) -> list[dict]:
    Hq, Hkv, Dh = ATTN_HEADS
    item = jnp.dtype(dtype).itemsize
    k = jnp.asarray(rng.standard_normal((batch, context, Hkv, Dh), np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((batch, context, Hkv, Dh), np.float32), dtype)
    q = jnp.asarray(rng.standard_normal((batch, Hq, Dh), np.float32), dtype)
    prefix_len = jnp.full((batch,), context - 1, jnp.int32)  # the last slot is the current token
    kmax, kmin, valid = page_summaries(k[:, :-1], prefix_len, PAGE_SIZE)
    kmax, kmin = kmax.astype(dtype), kmin.astype(dtype)
    P = valid.shape[1]
    dense_bytes = 2 * batch * context * Hkv * Dh * item
    rows = []
    for impl in impls:
        if impl == "xla":
            fn = jax.jit(_dense_attention)
            dense_s = _seconds(fn, (q, k, v), repeats)
        else:
            fn = jax.jit(functools.partial(_sparse_attention, num_pages=P, impl=impl, select=False))
            dense_s = _seconds(fn, (q, k[:, :-1], v[:, :-1], kmax, kmin, valid, prefix_len), repeats)
        rows.append(_row("attention", impl, 1.0, context, batch, dense_s, dense_bytes, 1.0, 1.0))
        for keep in keeps:
            n = max(1, math.ceil(keep * P))
            fn = jax.jit(functools.partial(_sparse_attention, num_pages=n, impl=impl, select=True))
            s = _seconds(fn, (q, k[:, :-1], v[:, :-1], kmax, kmin, valid, prefix_len), repeats)
            sparse_bytes = 2 * batch * Hkv * Dh * item * (n * PAGE_SIZE + P + 1)  # pages, summaries, current
            rows.append(_row("attention", impl, keep, context, batch, s, sparse_bytes,
                             dense_bytes / sparse_bytes, dense_s / s))
    return rows


def _dense_gate_up(x, wg, wu):
    return jax.nn.silu(x @ wg) * (x @ wu)


def bench_mlp(batch: int, keeps, impls, dtype, repeats: int, rng) -> list[dict]:
    D, F = MLP_DIMS
    item = jnp.dtype(dtype).itemsize
    x = jnp.asarray(rng.standard_normal((batch, D), np.float32), dtype)
    wg = jnp.asarray(0.02 * rng.standard_normal((D, F), np.float32), dtype)
    wu = jnp.asarray(0.02 * rng.standard_normal((D, F), np.float32), dtype)
    dense_bytes = 2 * D * F * item
    rows = []
    for impl in impls:
        if impl == "xla":
            dense_s = _seconds(jax.jit(_dense_gate_up), (x, wg, wu), repeats)
        else:
            all_ch, n_all = jnp.arange(D, dtype=jnp.int32), jnp.int32(D)
            fn = jax.jit(functools.partial(ops.sparse_gate_up, impl=impl))
            dense_s = _seconds(fn, (x, wg, wu, all_ch, n_all), repeats)
        rows.append(_row("mlp", impl, 1.0, None, batch, dense_s, dense_bytes, 1.0, 1.0))
        for keep in keeps:
            mask = prune_mask(x, jnp.full((batch,), keep, jnp.float32))
            xp = jnp.where(mask, x, 0)
            n = int(mask.any(0).sum())
            channels, num = union_channels(mask, n)  # capacity = the union: XLA gathers exactly those rows
            fn = jax.jit(functools.partial(ops.sparse_gate_up, impl=impl))
            s = _seconds(fn, (xp, wg, wu, channels, num), repeats)
            sparse_bytes = 2 * n * F * item
            rows.append(_row("mlp", impl, keep, None, batch, s, sparse_bytes, dense_bytes / sparse_bytes,
                             dense_s / s))
    return rows


def bench_swiglu(batch: int, keeps, repeats: int, rng) -> list[dict]:
    """The whole SwiGLU (gate, up, down) in float32: XLA's dense matmuls (``xla``, keep 1) and the
    C++ kernel (``cpu``) on the dense and on pruned inputs, whose pruned channels' gate/up rows it
    skips; weights stacked as one layer of ``[1, D, F]`` / ``[1, F, D]``."""
    from soljax.kernels.swiglu_cpu import swiglu_cpu, swiglu_reference

    D, F = MLP_DIMS
    f32 = jnp.float32
    x = jnp.asarray(rng.standard_normal((batch, D), np.float32))
    wg, wu = (jnp.asarray(0.02 * rng.standard_normal((1, D, F), np.float32)) for _ in range(2))
    wd = jnp.asarray(0.02 * rng.standard_normal((1, F, D), np.float32))
    dense_bytes = 3 * D * F * 4
    xla_s = _seconds(jax.jit(lambda x, g, u, d: swiglu_reference(x, g, u, d, layer=0)), (x, wg, wu, wd), repeats)
    rows = [_row("swiglu", "xla", 1.0, None, batch, xla_s, dense_bytes, 1.0, 1.0)]
    kernel = jax.jit(lambda x, g, u, d: swiglu_cpu(x, g, u, d, layer=0))
    dense_s = _seconds(kernel, (x, wg, wu, wd), repeats)
    rows.append(_row("swiglu", "cpu", 1.0, None, batch, dense_s, dense_bytes, 1.0, 1.0))
    for keep in keeps:
        mask = prune_mask(x, jnp.full((batch,), keep, f32))
        n = int(mask.any(0).sum())
        s = _seconds(kernel, (jnp.where(mask, x, 0), wg, wu, wd), repeats)
        nbytes = (2 * n + D) * F * 4
        rows.append(_row("swiglu", "cpu", keep, None, batch, s, nbytes, dense_bytes / nbytes, dense_s / s))
    return rows


def _row(op, impl, keep, context, batch, seconds, nbytes, ideal, speedup) -> dict:
    return {"op": op, "impl": impl, "keep": keep, "context": context, "batch": batch, "seconds": seconds,
            "bytes": int(nbytes), "ideal_speedup": float(ideal), "speedup": float(speedup)}


def device_name() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "") or d.platform
    return f"{d.platform}: {kind}"


def bench_kernels(contexts=(4096, 32768), batches=(1, 8), attn_keeps=(0.1, 0.2, 0.5), mlp_keeps=(0.5, 0.8),
                  impls=None, dtype: str | None = None, repeats: int | None = None, progress=None) -> dict:
    """All rows; ``impls`` default: xla and the C++ kernels (cpu) on CPU, xla and pallas on a GPU or
    TPU. ``cpu`` adds ``swiglu`` rows (the whole MLP, the C++ kernel beside XLA's dense one; float32)
    instead of the gate/up ``mlp`` rows. ``dtype`` default: bfloat16 on accelerators, float32 on CPU
    (XLA:CPU computes bfloat16 matmuls slowly)."""
    on_cpu = jax.default_backend() == "cpu"
    impls = tuple(impls or (("xla", "cpu") if on_cpu else ("xla", "pallas")))
    for impl in impls:
        ops.check_impl("impl", impl, ops.ATTENTION_IMPLS)
    dt = jnp.dtype(dtype or ("float32" if on_cpu else "bfloat16"))
    repeats = repeats or (3 if on_cpu else 20)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        for context in contexts:
            if progress:
                progress(f"attention, context {context}, batch {batch}")
            rows += bench_attention(context, batch, attn_keeps, impls, dt, repeats, rng)
        if progress:
            progress(f"mlp, batch {batch}")
        rows += bench_mlp(batch, mlp_keeps, [i for i in impls if i in ops.IMPLS], dt, repeats, rng)
        if "cpu" in impls and dt == jnp.float32:
            if progress:
                progress(f"swiglu, batch {batch}")
            rows += bench_swiglu(batch, mlp_keeps, repeats, rng)
    return {"device": device_name(), "dtype": dt.name, "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"device: {result['device']} ({result['dtype']})",
             f"{'op':>9} {'impl':>6} {'keep':>5} {'context':>7} {'batch':>5} {'ms':>9} {'MB':>9} "
             f"{'ideal x':>8} {'speedup':>8} {'achieved':>8}"]
    for r in result["rows"]:
        ctx = "-" if r["context"] is None else r["context"]
        lines.append(f"{r['op']:>9} {r['impl']:>6} {r['keep']:>5.2f} {ctx:>7} {r['batch']:>5} "
                     f"{1e3 * r['seconds']:>9.3f} {r['bytes'] / 1e6:>9.1f} {r['ideal_speedup']:>8.2f} "
                     f"{r['speedup']:>8.2f} {r['speedup'] / r['ideal_speedup']:>8.2f}")
    return "\n".join(lines)
