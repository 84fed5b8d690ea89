"""The kernel path of the controlled decode step (``attention_impl`` = ``pallas`` or ``cpu``,
``mlp_impl`` = ``pallas``).

Given the same keep decisions as the masked XLA path, these run the page-sparse attention and the
channel-sparse MLP of :mod:`soljax.kernels`, which read only the selected KV pages and the kept
weight rows. Results equal the masked path up to float32 summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soljax.compress.prune import prune_mask
from soljax.kernels import ops
from soljax.kernels.quest_attention import pages_from_keep
from soljax.kernels.sparse_mlp import union_channels


def page_attention(q_bkhgd, k_prefix, v_prefix, prefix_len, k_suffix, v_suffix, mask_p, mask_s, *,
                   page_size: int, impl: str, interpret: bool, kernel: str | None = None) -> jax.Array:
    """Attention of one layer from QUEST keep masks, reading only the kept prefix pages.

    ``q_bkhgd [B, K, Hkv, G, Dh]``; ``k_prefix``/``v_prefix [B, M, Hkv, Dh]``; ``k_suffix``/
    ``v_suffix [B, K, T, Hkv, Dh]``; ``mask_p [B, K, Hkv, G, M]`` and ``mask_s [B, K, Hkv, G, T]``:
    the attended keys (page-aligned over the prefix, as QUEST keeps whole pages). Returns
    ``[B, K, Hkv, G, Dh]``.
    """
    B, K, Hkv, G, Dh = q_bkhgd.shape
    M, T = k_prefix.shape[1], k_suffix.shape[2]
    Hq = Hkv * G
    mask_p = jnp.broadcast_to(mask_p, (B, K, Hkv, G, M))
    page_keep = mask_p[..., ::page_size].reshape(B, K, Hq, -1)  # a page's first slot speaks for it
    pages, num, heads = pages_from_keep(page_keep, Hkv)
    out = ops.quest_decode_attention(
        q_bkhgd.reshape(B, K, Hq, Dh), k_prefix, v_prefix, prefix_len, k_suffix, v_suffix,
        jnp.broadcast_to(mask_s, (B, K, Hkv, G, T)).reshape(B, K, Hq, T), pages, num, heads,
        page_size=page_size, impl=impl, interpret=interpret, kernel=kernel)
    return out.reshape(B, K, Hkv, G, Dh)


def sparse_mlp(lp: dict, x_bkd: jax.Array, rho, bits, *, interpret: bool, kernel: str | None = None):
    """SwiGLU MLP with the input pruned to ``rho`` and the output fake-quantized to ``bits`` (both
    ``[B, K]`` or None = untouched), reading only the weight rows of channels some row keeps."""
    B, K, D = x_bkd.shape
    x = x_bkd.reshape(B * K, D)
    if rho is None:
        keep = jnp.ones(x.shape, bool)
    else:
        keep = prune_mask(x, rho.reshape(B * K))
        x = jnp.where(keep, x, jnp.copysign(jnp.zeros_like(x), x))
    channels, num = union_channels(keep)
    a = ops.sparse_gate_up(x, lp["w_gate"], lp["w_up"], channels, num, impl="pallas", interpret=interpret,
                           kernel=kernel)
    b = jnp.full((B * K,), 16, jnp.int32) if bits is None else bits.reshape(B * K).astype(jnp.int32)
    out = ops.down_fake_quant(a, lp["w_down"], b, impl="pallas", interpret=interpret, kernel=kernel)
    return out.reshape(B, K, D)
