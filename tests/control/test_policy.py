"""The SOL policy network: incremental vs full pass, causality, sizes, init, torch cross-check."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_torch
from soljax.errors import SoljaxError
from soljax.control.network import (
    PolicyConfig, SOLPolicy, abstract_policy, count_params, init_cache, init_policy, param_count,
)
from soljax.distributions import entropy_categorical as entropy, greedy, log_prob, sample

H, E, A = 24, 20, 11  # small LM widths and action count for the numerical tests


def small_cfg(**kw) -> PolicyConfig:
    base = dict(d_model=32, n_heads=4, n_layers=1, mlp_ratio=4.0, action_dim=8, max_len=40,
                scalar_hidden=16, budget_hidden=8)
    base.update(kw)
    return PolicyConfig(**base)


def episode(seed: int, batch: int, t: int, num_actions: int = A):
    """Random per-step inputs ``(h_prev, tok_emb, scalars, prev_action, targets)``."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((batch, t, H)).astype(np.float32) * 2.0
    e = rng.standard_normal((batch, t, E)).astype(np.float32) * 0.5
    s = rng.uniform(-1, 1, (batch, t, 8)).astype(np.float32)
    a = rng.integers(0, num_actions, (batch, t)).astype(np.int32)
    a[:, 0] = num_actions  # BOS
    tg = rng.uniform(0.2, 1.0, (batch, 3)).astype(np.float32)
    return tuple(jnp.asarray(x) for x in (h, e, s, a, tg))


_JITTED: dict = {}


@functools.lru_cache(maxsize=None)
def params_for(cfg: PolicyConfig, seed: int = 0, num_actions: int = A):
    return init_policy(cfg, num_actions, H, E, jax.random.key(seed))


def full_pass(cfg, params, *inputs, num_actions: int = A):
    """The causal pass, jitted once per (config, actions)."""
    key = ("full", cfg, num_actions)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(SOLPolicy(cfg, num_actions).apply)
    return _JITTED[key](params, *inputs)


def run_steps(cfg, params, inputs, cache_len, num_actions: int = A):
    """Acts step by step inside a jitted ``lax.scan``; returns logits ``[B, T, A]``."""
    key = ("steps", cfg, num_actions, cache_len)
    if key not in _JITTED:
        module = SOLPolicy(cfg, num_actions)

        def go(params, h, e, s, a, tg):
            def body(cache, xs):
                ht, et, st, at = xs
                logits, cache = module.apply(params, cache, ht, et, st, at, tg,
                                             method=SOLPolicy.step)
                return cache, logits

            xs = tuple(jnp.moveaxis(x, 1, 0) for x in (h, e, s, a))
            cache, out = jax.lax.scan(body, module.init_cache(h.shape[0], cache_len), xs)
            return jnp.moveaxis(out, 0, 1), cache["pos"]

        _JITTED[key] = jax.jit(go)
    out, pos = _JITTED[key](params, *inputs)
    assert int(pos) == inputs[0].shape[1]
    return out


# ----------------------------------------------------------------------------------------------
# Two modes agree


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("batch, cache_len", [(1, 16), (2, 40), (5, 16)])
def test_step_matches_full_pass(n_layers, batch, cache_len):
    """Episode-sized and max_len-sized caches give the full pass's logits."""
    cfg = small_cfg(n_layers=n_layers)
    params = params_for(cfg, n_layers)
    inputs = episode(10 * batch + n_layers, batch, 16)
    full = full_pass(cfg, params, *inputs)
    assert full.shape == (batch, 16, A) and full.dtype == jnp.float32
    stepped = run_steps(cfg, params, inputs, cache_len)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), atol=1e-5, rtol=0)


def test_step_unjitted_and_cache_layout():
    cfg = small_cfg(n_layers=2)
    module = SOLPolicy(cfg, A)
    params = params_for(cfg)
    h, e, s, a, tg = episode(0, 2, 3)
    cache = init_cache(cfg, 2, 3)
    assert cache["k"].shape == (2, 2, 3, 4, 8) and cache["v"].shape == cache["k"].shape
    assert cache["pos"].dtype == jnp.int32 and int(cache["pos"]) == 0
    full = full_pass(cfg, params, h, e, s, a, tg)
    for t in range(3):
        logits, cache = module.apply(params, cache, h[:, t], e[:, t], s[:, t], a[:, t], tg,
                                     method=SOLPolicy.step)
        assert logits.shape == (2, A)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]), atol=1e-5, rtol=0)
    assert int(cache["pos"]) == 3


def test_low_precision_inputs_are_cast_to_f32():
    cfg = small_cfg()
    params = params_for(cfg)
    h, e, s, a, tg = episode(1, 2, 16)
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    out = full_pass(cfg, params, bf(h), bf(e), bf(s), a, bf(tg))
    ref = full_pass(cfg, params, bf(h).astype(jnp.float32), bf(e).astype(jnp.float32),
                       bf(s).astype(jnp.float32), a, bf(tg).astype(jnp.float32))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


# ----------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("t_change", [0, 5, 15])
def test_causality(t_change):
    cfg = small_cfg(n_layers=2)
    params = params_for(cfg, 2)
    h, e, s, a, tg = episode(7, 2, 16)
    base = full_pass(cfg, params, h, e, s, a, tg)
    rng = np.random.default_rng(99)
    for which in range(4):  # perturb one input stream at steps >= t_change
        args = [h, e, s, a]
        x = np.array(args[which])
        if which == 3:
            x[:, t_change:] = (x[:, t_change:] + 1 + rng.integers(0, A - 1, x[:, t_change:].shape)) % A
        else:
            x[:, t_change:] += rng.standard_normal(x[:, t_change:].shape).astype(np.float32)
        args[which] = jnp.asarray(x)
        out = full_pass(cfg, params, *args, tg)
        np.testing.assert_allclose(np.asarray(out[:, :t_change]), np.asarray(base[:, :t_change]),
                                   atol=1e-6, rtol=0)
        assert np.abs(np.asarray(out[:, t_change]) - np.asarray(base[:, t_change])).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Sizes


def expected_count(h, e, a, *, d=512, heads=4, layers=1, mlp_ratio=4.0, action_dim=32,
                   max_len=1024, scalar_dim=8, scalar_hidden=64, budget_hidden=32):
    """Parameter count written out layer by layer from the architecture."""
    assert d % heads == 0
    ffn = int(mlp_ratio * d)
    scalar = scalar_dim * scalar_hidden + scalar_hidden + 2 * scalar_hidden  # Linear + LayerNorm
    act_emb = (a + 1) * action_dim
    in_proj = (h + e + scalar_hidden + action_dim) * d + d
    pos = max_len * d
    block = (2 * d                     # LN before attention
             + 4 * d * d               # q, k, v, o without biases
             + 2 * d                   # LN before FFN
             + d * ffn + ffn           # FFN in
             + ffn * d + d)            # FFN out
    ln_f = 2 * d
    pi = d * a + a
    budget = 3 * budget_hidden + budget_hidden + budget_hidden * a + a
    return scalar + act_emb + in_proj + pos + layers * block + ln_f + pi + budget


@pytest.mark.parametrize("h, a, max_len, spec_m", [
    (2048, 1560, 1024, 6.73),   # Llama-3.2-1B, joint grid
    (2048, 8, 1024, 5.83),      # 1B, v2 grid (A = 8)
    (3072, 1560, 512, 7.51),    # 3B: the spec's count corresponds to max_len 512
    (4096, 1560, 512, 8.56),    # 8B: likewise
])
def test_param_count_matches_spec(h, a, max_len, spec_m):
    cfg = PolicyConfig(max_len=max_len)  # official d=512, 4 heads, 1 layer, ratio 4, action_dim 32
    n = param_count(cfg, a, h, h)
    assert n == expected_count(h, h, a, max_len=max_len)
    assert round(n / 1e6, 2) == spec_m


def test_param_count_hand_values():
    assert expected_count(2048, 2048, 1560) == 6_725_008
    assert expected_count(2048, 2048, 8) == 5_827_952


def test_param_count_small_and_abstract():
    cfg = small_cfg(n_layers=2, mlp_ratio=3.0)
    params = params_for(cfg)
    want = expected_count(H, E, A, d=32, heads=4, layers=2, mlp_ratio=3.0, action_dim=8,
                          max_len=40, scalar_hidden=16, budget_hidden=8)
    assert count_params(params) == want == param_count(cfg, A, H, E)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_policy(cfg, A, H, E))
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------
# Temperature, budget head, init


def test_temperature_scales_logits():
    params = params_for(small_cfg())
    inputs = episode(5, 2, 16)
    l13 = full_pass(small_cfg(), params, *inputs)  # small_cfg keeps the default 1.3
    l05 = full_pass(small_cfg(temperature=0.5), params, *inputs)
    np.testing.assert_allclose(np.asarray(l05), np.asarray(l13) * 1.3 * 2.0, rtol=1e-5, atol=1e-6)
    assert PolicyConfig().temperature == 1.3


def test_budget_head_offsets_logits():
    cfg = small_cfg()
    params = params_for(cfg)
    h, e, s, a, tg = episode(6, 2, 16)
    tg2 = tg.at[:, 0].add(-0.3)
    l1 = np.asarray(full_pass(cfg, params, h, e, s, a, tg))
    l2 = np.asarray(full_pass(cfg, params, h, e, s, a, tg2))
    diff = l2 - l1
    assert np.abs(diff).max() > 1e-3
    # targets enter only through an additive offset, identical at every step
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1], diff.shape), atol=1e-5)
    # per-step targets [B, T, 3] equal to the episode targets give the same logits
    l3 = full_pass(cfg, params, h, e, s, a, jnp.broadcast_to(tg[:, None], (2, 16, 3)))
    np.testing.assert_allclose(np.asarray(l3), l1, atol=1e-6, rtol=0)
    # without the budget head's output layer, targets have no effect
    p0 = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "budget_out" in jax.tree_util.keystr(path) else x, params)
    np.testing.assert_allclose(np.asarray(full_pass(cfg, p0, h, e, s, a, tg)),
                               np.asarray(full_pass(cfg, p0, h, e, s, a, tg2)), atol=0, rtol=0)


def test_init_statistics():
    cfg = small_cfg(n_layers=2)  # d 32, ffn 128, action_dim 8, scalar_hidden 16, budget 8
    params = params_for(cfg)["params"]
    linears = {
        "scalar_proj": 8, "in_proj": H + E + 16 + 8, "budget_in": 3, "budget_out": 8,
        "pi_head": 32,
        **{f"blocks_{i}/{n}": 32 for i in range(2) for n in ("q_proj", "k_proj", "v_proj",
                                                              "o_proj", "mlp_in")},
        **{f"blocks_{i}/mlp_out": 128 for i in range(2)},
    }
    for name, fan_in in linears.items():
        p = params
        for part in name.split("/"):
            p = p[part]
        bound = 1 / math.sqrt(fan_in)
        w = np.asarray(p["kernel"])
        assert w.shape[0] == fan_in
        assert np.abs(w).max() <= bound
        if w.size >= 2048:  # uniform: std = bound / sqrt(3), and it fills the range
            assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.06
            assert np.abs(w).max() > 0.99 * bound
        if name.split("/")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert set(p) == {"kernel"}  # no attention biases
        elif name == "pi_head":
            assert np.all(np.asarray(p["bias"]) == 0)
        else:
            b = np.asarray(p["bias"])
            assert np.abs(b).max() <= bound and np.abs(b).max() > 0
    emb = np.concatenate([np.ravel(params["action_emb"]["embedding"]),
                          np.ravel(params["pos_emb"])])  # both N(0, 1)
    assert abs(emb.mean()) < 0.1 and abs(emb.std() - 1) < 0.1
    assert params["action_emb"]["embedding"].shape == (A + 1, 8)
    assert params["pos_emb"].shape == (40, 32)
    for ln in (params["scalar_ln"], params["ln_f"], params["blocks_0"]["ln_attn"],
               params["blocks_1"]["ln_mlp"]):
        assert np.all(np.asarray(ln["scale"]) == 1) and np.all(np.asarray(ln["bias"]) == 0)
    assert "value" not in str(jax.tree_util.tree_structure(params))


def test_init_is_reproducible_from_key():
    cfg = small_cfg()
    p1 = init_policy(cfg, A, H, E, jax.random.key(1))
    p2 = init_policy(cfg, A, H, E, jax.random.key(1))
    p3 = init_policy(cfg, A, H, E, jax.random.key(2))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), p1, p2)
    assert not np.array_equal(np.asarray(p1["params"]["in_proj"]["kernel"]),
                              np.asarray(p3["params"]["in_proj"]["kernel"]))


# ----------------------------------------------------------------------------------------------
# Distribution helpers


def test_distribution_helpers():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 4, 7)).astype(np.float32) * 2)
    logp = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    ent = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(np.asarray(entropy(logits)), ent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(entropy(jnp.zeros(9))), math.log(9), rtol=1e-6)
    assert float(entropy(jnp.array([0.0, -jnp.inf, 3.0]))) >= 0
    acts = jnp.asarray(rng.integers(0, 7, (3, 4)))
    want = np.take_along_axis(logp, np.asarray(acts)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(log_prob(logits, acts)), want, rtol=1e-5, atol=1e-6)
    g = greedy(logits)
    assert g.dtype == jnp.int32 and g.shape == (3, 4)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(logits).argmax(-1))
    s = sample(logits, jax.random.key(0))
    assert s.dtype == jnp.int32 and s.shape == (3, 4)
    assert np.all((np.asarray(s) >= 0) & (np.asarray(s) < 7))
    # empirical frequencies follow softmax(logits)
    row = jnp.array([0.0, 1.0, 2.0, -1.0])
    draws = np.asarray(sample(jnp.broadcast_to(row, (20000, 4)), jax.random.key(3)))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(row)), atol=0.015)


def test_gradients_flow_to_all_params():
    cfg = small_cfg(n_layers=2)
    module = SOLPolicy(cfg, A)
    params = params_for(cfg)
    h, e, s, a, tg = episode(0, 2, 8)
    acts = jnp.asarray(np.random.default_rng(1).integers(0, A, (2, 8)))

    def loss(p):
        logits = module.apply(p, h, e, s, a, tg)
        return -(log_prob(logits, acts).mean() + 0.05 * entropy(logits).mean())

    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in flat:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        name = jax.tree_util.keystr(path)
        if "pos_emb" in name:
            assert np.abs(g[:8]).max() > 0 and np.all(g[8:] == 0)  # only the T used rows
        elif "action_emb" in name:
            continue  # only the rows of actions that occurred get gradient
        else:
            assert np.abs(g).max() > 0, name


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kw", [
    dict(d_model=30, n_heads=4), dict(d_model=0), dict(n_heads=-1), dict(n_layers=0),
    dict(n_layers=1.5), dict(action_dim=True), dict(max_len="1024"), dict(scalar_hidden=0),
    dict(budget_hidden=0), dict(scalar_dim=0), dict(temperature=0.0), dict(temperature=-1.3),
    dict(temperature=float("nan")), dict(mlp_ratio=0.0), dict(mlp_ratio=float("inf")),
    dict(mlp_ratio=0.001),
])
def test_bad_config_raises(kw):
    with pytest.raises(SoljaxError) as info:
        PolicyConfig(**kw)
    assert "\n" not in str(info.value)


def test_config_is_frozen_kw_only():
    cfg = PolicyConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.mlp_ratio, cfg.action_dim, cfg.max_len,
            cfg.scalar_dim, cfg.scalar_hidden, cfg.budget_hidden) == (512, 4, 1, 4.0, 32, 1024, 8, 64, 32)
    assert cfg.ffn_dim == 2048 and cfg.head_dim == 128
    with pytest.raises(TypeError):
        PolicyConfig(512)  # noqa
    with pytest.raises(Exception):
        cfg.d_model = 3  # type: ignore[misc]
    assert PolicyConfig(d_model=64, n_heads=2) == PolicyConfig(d_model=64, n_heads=2)
    hash(cfg)


def test_bad_sizes_raise():
    cfg = small_cfg()
    with pytest.raises(SoljaxError):
        SOLPolicy(cfg, 0)
    with pytest.raises(SoljaxError):
        init_policy(cfg, -3, H, E, jax.random.key(0))
    with pytest.raises(SoljaxError):
        init_policy(cfg, A, 0, E, jax.random.key(0))
    with pytest.raises(SoljaxError):
        SOLPolicy({"d_model": 32}, A)  # type: ignore[arg-type]
    with pytest.raises(SoljaxError):
        init_cache(cfg, 2, cfg.max_len + 1)
    with pytest.raises(SoljaxError):
        init_cache(cfg, 0, 4)
    params = params_for(cfg)
    with pytest.raises(SoljaxError):
        SOLPolicy(cfg, A).apply(params, *episode(0, 1, cfg.max_len + 1))


# ----------------------------------------------------------------------------------------------
# Cross-check against an independent torch implementation


def test_matches_torch_reference():
    torch = require_torch()
    from torch import nn as tnn

    class TorchBlock(tnn.Module):
        def __init__(self, d, heads, ffn):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = tnn.LayerNorm(d, eps=1e-5), tnn.LayerNorm(d, eps=1e-5)
            self.q, self.k, self.v, self.o = (tnn.Linear(d, d, bias=False) for _ in range(4))
            self.fc1, self.fc2 = tnn.Linear(d, ffn), tnn.Linear(ffn, d)

        def forward(self, x):
            b, t, d = x.shape
            hd = d // self.heads
            y = self.ln1(x)
            q, k, v = (m(y).view(b, t, self.heads, hd).transpose(1, 2) for m in (self.q, self.k, self.v))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(tnn.functional.gelu(self.fc1(self.ln2(x))))

    class TorchPolicy(tnn.Module):
        def __init__(self, cfg, a, h, e):
            super().__init__()
            d = cfg.d_model
            self.temperature = cfg.temperature
            self.scalar_proj = tnn.Sequential(tnn.Linear(cfg.scalar_dim, cfg.scalar_hidden),
                                              tnn.GELU(), tnn.LayerNorm(cfg.scalar_hidden, eps=1e-5))
            self.act_emb = tnn.Embedding(a + 1, cfg.action_dim)
            self.inp = tnn.Linear(h + e + cfg.scalar_hidden + cfg.action_dim, d)
            self.pos = tnn.Embedding(cfg.max_len, d)
            self.blocks = tnn.ModuleList(TorchBlock(d, cfg.n_heads, cfg.ffn_dim)
                                         for _ in range(cfg.n_layers))
            self.ln_f = tnn.LayerNorm(d, eps=1e-5)
            self.pi = tnn.Linear(d, a)
            self.budget = tnn.Sequential(tnn.Linear(3, cfg.budget_hidden), tnn.GELU(),
                                         tnn.Linear(cfg.budget_hidden, a))

        def forward(self, h, e, s, prev, tg):
            t = h.shape[1]
            x = self.inp(torch.cat([h, e, self.scalar_proj(s), self.act_emb(prev)], -1))
            x = x + self.pos(torch.arange(t))[None]
            for blk in self.blocks:
                x = blk(x)
            return (self.pi(self.ln_f(x)) + self.budget(tg)[:, None]) / self.temperature

    cfg = small_cfg(n_layers=2, temperature=1.3)
    params = params_for(cfg, 2)
    p = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), params["params"])
    ref = TorchPolicy(cfg, A, H, E)

    def lin(m, q):
        m.weight.copy_(q["kernel"].T)
        if m.bias is not None:
            m.bias.copy_(q["bias"])

    def ln(m, q):
        m.weight.copy_(q["scale"])
        m.bias.copy_(q["bias"])

    with torch.no_grad():
        lin(ref.scalar_proj[0], p["scalar_proj"])
        ln(ref.scalar_proj[2], p["scalar_ln"])
        ref.act_emb.weight.copy_(p["action_emb"]["embedding"])
        lin(ref.inp, p["in_proj"])
        ref.pos.weight.copy_(p["pos_emb"])
        for i, blk in enumerate(ref.blocks):
            q = p[f"blocks_{i}"]
            ln(blk.ln1, q["ln_attn"])
            ln(blk.ln2, q["ln_mlp"])
            for m, n in ((blk.q, "q_proj"), (blk.k, "k_proj"), (blk.v, "v_proj"), (blk.o, "o_proj"),
                         (blk.fc1, "mlp_in"), (blk.fc2, "mlp_out")):
                lin(m, q[n])
        ln(ref.ln_f, p["ln_f"])
        lin(ref.pi, p["pi_head"])
        lin(ref.budget[0], p["budget_in"])
        lin(ref.budget[2], p["budget_out"])
        # non-zero b_pi, so the head bias is exercised too
        ref.pi.bias.copy_(torch.linspace(-0.5, 0.5, A))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.linspace(-0.5, 0.5, A, dtype=jnp.float32)
        if jax.tree_util.keystr(path).endswith("['pi_head']['bias']") else x, params)

    inputs = episode(21, 3, 16)
    ours = np.asarray(full_pass(cfg, params, *inputs))
    with torch.no_grad():
        theirs = ref(*(torch.from_numpy(np.array(x)) for x in inputs)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    stepped = run_steps(cfg, params, inputs, 16)
    np.testing.assert_allclose(np.asarray(stepped), theirs, atol=1e-5, rtol=0)
