"""The SOL policy: a tiny causal transformer over the decode steps of one episode.

One policy "token" is one LM decode step. At step ``t`` the policy sees

- ``h_prev`` ``[H]``: the LM's final-norm hidden state (the ``lm_head`` input) at the previous
  position,
- ``tok_emb`` ``[E]``: the LM input embedding of the token processed at step ``t``,
- ``scalars`` ``[8]``: the budget-conditioning features ``[t_frac, eff_flag, C_tok, C_pru, C_q,
  dev_tok, dev_pru, dev_q]``,
- ``prev_action``: the previous action id (``num_actions``, the grid's ``bos_id``, at ``t = 0``),
- ``targets`` ``[3]``: the budget targets ``[C_tok, C_pru, C_q]`` (quant as bits / 16),

and returns logits over the ``A = num_actions`` joint actions::

    x_t = Linear(H + E + 64 + action_dim -> d)(concat[h_prev, tok_emb, scalar_proj(s_t),
                                                      act_emb(a_{t-1})]) + pos_emb[t]
    n_layers x pre-LN block:  x += MHA(LN(x))   (causal, no q/k/v/o biases, scale 1/sqrt(d/heads))
                              x += FFN(LN(x))   (Linear(d -> mlp_ratio*d) -> GELU(erf) -> Linear)
    logits_t = (W_pi LN_f(x_t) + b_pi + BudgetHead(targets)) / temperature

with ``scalar_proj = Linear(8 -> 64) -> GELU -> LayerNorm`` and ``BudgetHead = Linear(3 -> 32) ->
GELU -> Linear(32 -> A)``. LayerNorms use eps 1e-5. Parameters are initialised like PyTorch's
defaults (Linear weight and bias uniform in +-1/sqrt(fan_in), embeddings N(0, 1), LayerNorm 1/0)
except ``b_pi``, which starts at zero. There is no value head: the training objective never uses
one. All policy math is float32 at full matmul precision, whatever the inputs' dtype.

The module has two modes over the same parameters, which agree numerically:

- ``policy.apply(params, h_prev, tok_emb, scalars, prev_action, targets)`` on ``[B, T, ...]``
  inputs: a causal pass over a whole episode (used for the loss);
- ``policy.apply(params, cache, h_prev, tok_emb, scalars, prev_action, targets,
  method=SOLPolicy.step)`` on ``[B, ...]`` inputs: one incremental step with the policy's own
  KV cache (used for acting, e.g. inside ``lax.scan``). Start from ``init_cache(cfg, B, T)``.

Parameters are a plain ``{"params": ...}`` pytree (``init_policy``), so they jit, scan and
checkpoint like any other array tree.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from soljax.errors import SoljaxError

HIGHEST = jax.lax.Precision.HIGHEST
LN_EPS = 1e-5

PolicyCache = dict[str, Any]
"""``{"k": [L, B, S, heads, head_dim], "v": same, "pos": int32 []}``; ``pos`` = steps taken."""


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """Policy sizes and the sampling temperature (defaults: the official SOL policy).

    ``d_model`` must be divisible by ``n_heads``; the FFN width is ``int(mlp_ratio * d_model)``;
    ``max_len`` bounds the episode length (the learned position table has ``max_len`` rows);
    ``temperature`` divides the logits in both modes (training samples and computes the loss and
    entropy from the tempered logits).
    """

    d_model: int = 512
    n_heads: int = 4
    n_layers: int = 1
    mlp_ratio: float = 4.0
    action_dim: int = 32
    max_len: int = 1024
    scalar_dim: int = 8
    scalar_hidden: int = 64
    budget_hidden: int = 32
    temperature: float = 1.3

    def __post_init__(self):
        for name in ("d_model", "n_heads", "n_layers", "action_dim", "max_len", "scalar_dim",
                     "scalar_hidden", "budget_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise SoljaxError(f"PolicyConfig.{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("mlp_ratio", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise SoljaxError(f"PolicyConfig.{name} must be a finite number > 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.d_model % self.n_heads:
            raise SoljaxError(f"PolicyConfig.d_model ({self.d_model}) must be divisible by "
                              f"n_heads ({self.n_heads})")
        if self.ffn_dim < 1:
            raise SoljaxError(f"PolicyConfig.mlp_ratio ({self.mlp_ratio}) gives an empty FFN for "
                              f"d_model {self.d_model}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.mlp_ratio * self.d_model)


def _check_num_actions(num_actions) -> int:
    if isinstance(num_actions, bool) or not isinstance(num_actions, numbers.Integral) or num_actions < 1:
        raise SoljaxError(f"num_actions must be a positive integer, got {num_actions!r}")
    return int(num_actions)


# ----------------------------------------------------------------------------------------------
# Layers


def _torch_uniform(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Linear weight and bias init."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Linear(nn.Module):
    """``y = x @ kernel + bias`` in float32, kernel ``[in, out]``, PyTorch default init."""

    features: int
    use_bias: bool = True
    zero_bias: bool = False

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", _torch_uniform(fan_in), (fan_in, self.features), jnp.float32)
        y = jnp.matmul(x, kernel, precision=HIGHEST)
        if self.use_bias:
            bias_init = nn.initializers.zeros_init() if self.zero_bias else _torch_uniform(fan_in)
            y = y + self.param("bias", bias_init, (self.features,), jnp.float32)
        return y


def _layer_norm() -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False)


def _gelu(x):
    return nn.gelu(x, approximate=False)


def _attend(q, k, v, mask, scale: float):
    """Softmax attention. q ``[B, Tq, h, hd]``, k/v ``[B, Tk, h, hd]``, mask ``[Tq, Tk]`` bool."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=HIGHEST)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + MHA(LN(x))`` then ``x + FFN(LN(x))``."""

    cfg: PolicyConfig

    def setup(self):
        c = self.cfg
        self.ln_attn = _layer_norm()
        self.q_proj = Linear(c.d_model, use_bias=False)
        self.k_proj = Linear(c.d_model, use_bias=False)
        self.v_proj = Linear(c.d_model, use_bias=False)
        self.o_proj = Linear(c.d_model, use_bias=False)
        self.ln_mlp = _layer_norm()
        self.mlp_in = Linear(c.ffn_dim)
        self.mlp_out = Linear(c.d_model)

    def _qkv(self, x):
        c = self.cfg
        hx = self.ln_attn(x)
        split = lambda y: y.reshape(*y.shape[:-1], c.n_heads, c.head_dim)  # noqa: E731
        return split(self.q_proj(hx)), split(self.k_proj(hx)), split(self.v_proj(hx))

    def _finish(self, x, attn):
        x = x + self.o_proj(attn.reshape(*attn.shape[:-2], self.cfg.d_model))
        return x + self.mlp_out(_gelu(self.mlp_in(self.ln_mlp(x))))

    def __call__(self, x):
        """Causal pass over ``x [B, T, d]``."""
        q, k, v = self._qkv(x)
        t = x.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))
        return self._finish(x, _attend(q, k, v, mask, 1.0 / math.sqrt(self.cfg.head_dim)))

    def decode(self, x, k_cache, v_cache, pos):
        """One step: ``x [B, d]`` at position ``pos``; caches ``[B, S, heads, head_dim]``."""
        q, k, v = self._qkv(x[:, None])
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, pos, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, pos, axis=1)
        mask = (jnp.arange(k_cache.shape[1]) <= pos)[None, :]
        out = _attend(q, k_cache, v_cache, mask, 1.0 / math.sqrt(self.cfg.head_dim))
        return self._finish(x[:, None], out)[:, 0], k_cache, v_cache


class SOLPolicy(nn.Module):
    """The SOL policy network (see the module docstring for the architecture and the two modes).

    ``num_actions`` is the grid size ``A`` (``ActionGrid.num_actions``); the action embedding has
    ``A + 1`` rows, the last one for the "no previous action" id ``A`` (``ActionGrid.bos_id``).
    The LM widths ``H`` and ``E`` are taken from the inputs at init.
    """

    cfg: PolicyConfig
    num_actions: int

    def __post_init__(self):
        if not isinstance(self.cfg, PolicyConfig):
            raise SoljaxError(f"SOLPolicy.cfg must be a PolicyConfig, got {type(self.cfg).__name__}")
        _check_num_actions(self.num_actions)
        super().__post_init__()

    def setup(self):
        c = self.cfg
        self.scalar_proj = Linear(c.scalar_hidden)
        self.scalar_ln = _layer_norm()
        self.action_emb = nn.Embed(self.num_actions + 1, c.action_dim,
                                   embedding_init=nn.initializers.normal(1.0),
                                   param_dtype=jnp.float32, dtype=jnp.float32)
        self.in_proj = Linear(c.d_model)
        self.pos_emb = self.param("pos_emb", nn.initializers.normal(1.0), (c.max_len, c.d_model),
                                  jnp.float32)
        self.blocks = [Block(c) for _ in range(c.n_layers)]
        self.ln_f = _layer_norm()
        self.pi_head = Linear(self.num_actions, zero_bias=True)
        self.budget_in = Linear(c.budget_hidden)
        self.budget_out = Linear(self.num_actions)

    # -- shared pieces ------------------------------------------------------------------------

    def _embed_inputs(self, h_prev, tok_emb, scalars, prev_action):
        """Input projection (no position term) for any leading shape ``[...]``."""
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        s = self.scalar_ln(_gelu(self.scalar_proj(f32(scalars))))
        a = self.action_emb(jnp.asarray(prev_action, jnp.int32))
        return self.in_proj(jnp.concatenate([f32(h_prev), f32(tok_emb), s, a], axis=-1))

    def _head(self, x, targets):
        """Tempered logits from the last residual stream ``x [..., d]`` and ``targets [..., 3]``."""
        bias = self.budget_out(_gelu(self.budget_in(jnp.asarray(targets, jnp.float32))))
        return (self.pi_head(self.ln_f(x)) + bias) / self.cfg.temperature

    # -- modes ---------------------------------------------------------------------------------

    def __call__(self, h_prev, tok_emb, scalars, prev_action, targets):
        """Causal pass over an episode: ``[B, T, ...]`` inputs, ``targets [B, 3]`` (or
        ``[B, T, 3]``) -> logits ``[B, T, A]``."""
        t = h_prev.shape[1]
        if t > self.cfg.max_len:
            raise SoljaxError(f"episode length {t} exceeds the policy's max_len {self.cfg.max_len}")
        x = self._embed_inputs(h_prev, tok_emb, scalars, prev_action) + self.pos_emb[:t]
        for block in self.blocks:
            x = block(x)
        targets = jnp.asarray(targets)
        if targets.ndim == x.ndim - 1:
            targets = targets[:, None, :]
        return self._head(x, targets)

    def step(self, cache: PolicyCache, h_prev, tok_emb, scalars, prev_action, targets):
        """One incremental step: ``[B, ...]`` inputs at position ``cache["pos"]`` -> (logits
        ``[B, A]``, cache advanced by one). The caller takes at most ``S`` (the cache length)
        steps per episode; a fresh episode starts from a fresh ``init_cache``."""
        pos = cache["pos"]
        x = self._embed_inputs(h_prev, tok_emb, scalars, prev_action)
        x = x + jax.lax.dynamic_index_in_dim(self.pos_emb, pos, axis=0, keepdims=False)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.decode(x, cache["k"][i], cache["v"][i], pos)
            ks.append(k)
            vs.append(v)
        new_cache = {"k": jnp.stack(ks), "v": jnp.stack(vs), "pos": pos + 1}
        return self._head(x, targets), new_cache

    def init_cache(self, batch: int, length: int) -> PolicyCache:
        """An empty cache for ``batch`` rows and an episode of ``length`` steps (see ``init_cache``)."""
        return init_cache(self.cfg, batch, length)


# ----------------------------------------------------------------------------------------------
# Functional helpers


def init_cache(cfg: PolicyConfig, batch: int, length: int) -> PolicyCache:
    """Zero KV caches ``[n_layers, batch, length, n_heads, head_dim]`` (float32) and ``pos = 0``.

    ``length`` is the episode length ``T`` (at most ``cfg.max_len``).
    """
    for name, v in (("batch", batch), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise SoljaxError(f"init_cache: {name} must be a positive integer, got {v!r}")
    if length > cfg.max_len:
        raise SoljaxError(f"init_cache: episode length {length} exceeds the policy's max_len "
                          f"{cfg.max_len}")
    shape = (cfg.n_layers, int(batch), int(length), cfg.n_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}


def _dummy_inputs(cfg: PolicyConfig, num_actions: int, lm_hidden: int, lm_embed: int):
    for name, v in (("lm_hidden", lm_hidden), ("lm_embed", lm_embed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise SoljaxError(f"{name} must be a positive integer, got {v!r}")
    return (jnp.zeros((1, 1, lm_hidden), jnp.float32), jnp.zeros((1, 1, lm_embed), jnp.float32),
            jnp.zeros((1, 1, cfg.scalar_dim), jnp.float32),
            jnp.full((1, 1), num_actions, jnp.int32), jnp.zeros((1, 3), jnp.float32))


def init_policy(cfg: PolicyConfig, num_actions: int, lm_hidden: int, lm_embed: int,
                key: jax.Array) -> dict:
    """Fresh policy variables ``{"params": ...}`` for LM widths ``lm_hidden`` (H) and ``lm_embed`` (E)."""
    num_actions = _check_num_actions(num_actions)
    module = SOLPolicy(cfg, num_actions)
    return module.init(key, *_dummy_inputs(cfg, num_actions, lm_hidden, lm_embed))


def abstract_policy(cfg: PolicyConfig, num_actions: int, lm_hidden: int, lm_embed: int) -> dict:
    """The shapes/dtypes (``jax.ShapeDtypeStruct``) of ``init_policy``'s result; allocates nothing."""
    num_actions = _check_num_actions(num_actions)
    module = SOLPolicy(cfg, num_actions)
    return jax.eval_shape(module.init, jax.random.key(0),
                          *_dummy_inputs(cfg, num_actions, lm_hidden, lm_embed))


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree (arrays or shape structs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def param_count(cfg: PolicyConfig, num_actions: int, lm_hidden: int, lm_embed: int) -> int:
    """Number of policy parameters for these sizes, without allocating them."""
    return count_params(abstract_policy(cfg, num_actions, lm_hidden, lm_embed))


__all__ = [
    "Block", "Linear", "PolicyCache", "PolicyConfig", "SOLPolicy", "abstract_policy",
    "count_params", "init_cache", "init_policy", "param_count",
]
