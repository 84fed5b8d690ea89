"""The LM parameter pytree: layers stacked on a leading axis, matrices stored as ``x @ W``.

::

    embed        [V, D]
    final_norm   [D]
    lm_head      [D, V]             (only when embeddings are untied)
    layers:
      attn_norm  [L, D]             mlp_norm  [L, D]
      wq         [L, D, Hq, Dh]     bq        [L, Hq, Dh]   (qkv_bias)
      wk, wv     [L, D, Hkv, Dh]    bk, bv    [L, Hkv, Dh]  (qkv_bias)
      wo         [L, Hq, Dh, D]     bo        [L, D]        (o_bias)
      q_norm, k_norm [L, Dh]                                (qk_norm)
      w_gate, w_up [L, D, F]        w_down    [L, F, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soljax.lm.config import LMConfig


def param_shapes(cfg: LMConfig) -> dict:
    """Nested dict of shapes for every parameter of ``cfg``."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Hq, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, Hq, Dh),
        "wk": (L, D, Hkv, Dh),
        "wv": (L, D, Hkv, Dh),
        "wo": (L, Hq, Dh, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, Hq, Dh), bk=(L, Hkv, Dh), bv=(L, Hkv, Dh))
    if cfg.o_bias:
        layers["bo"] = (L, D)
    if cfg.qk_norm:
        layers.update(q_norm=(L, Dh), k_norm=(L, Dh))
    shapes = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def abstract_params(cfg: LMConfig, sharding=None) -> dict:
    """``jax.ShapeDtypeStruct`` tree for ``cfg`` (the target of checkpoint restores).

    ``sharding`` is either None, one sharding for every leaf, or a function ``(path, shape) ->
    sharding``.
    """
    dtype = jnp.dtype(cfg.dtype)

    def leaf(path, shape):
        s = sharding(path, shape) if callable(sharding) else sharding
        return jax.ShapeDtypeStruct(shape, dtype, sharding=s)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=_is_shape)


def init_params(cfg: LMConfig, key: jax.Array, scale: float = 0.02) -> dict:
    """Random parameters (normal weights, norm scales around 1), for tests and tiny experiments."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(flat))
    dtype = jnp.dtype(cfg.dtype)
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            leaves.append((1.0 + 0.1 * jax.random.normal(k, shape)).astype(dtype))
        else:
            leaves.append((scale * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
