"""The controlled decode step over a shared prefix: exactness, row independence, layout, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.compress.attention import quest_keep
from soljax.errors import SoljaxError
from soljax.lm import LMConfig, decode_step, init_params, prefill
from soljax.lm.controlled import (Controls, SparsityConfig, SuffixCache, controlled_step,
                                  prefill_shared)
from soljax.eval.schedules import run_schedules

CFG = LMConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=6,
               num_kv_heads=2, head_dim=8)
PARAMS = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
B, K, M, T = 2, 3, 29, 6
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (B, M + T + 1), 0, CFG.vocab_size)
LENGTHS = jnp.array([M, 19])  # ragged contexts: row 1 uses only 19 of its 29 prefix slots
QUEST = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1)


def _controls(seed, shape=(B, K)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return Controls(kappa=jax.random.choice(k1, jnp.array([0.1, 0.3, 0.6, 1.0]), shape),
                    rho=jax.random.choice(k2, jnp.array([0.4, 0.7, 1.0]), shape),
                    bits=jax.random.choice(k3, jnp.array([4, 6, 16]), shape))


def _rollout(scfg, controls_per_step, tokens=TOKENS, lengths=LENGTHS, schedules=K):
    """Runs T controlled steps; returns per-step logits [T, B, K, V] and infos."""
    nb = tokens.shape[0]
    _, prefix = prefill_shared(CFG, scfg, PARAMS, tokens[:, :M], lengths)
    suffix = SuffixCache.empty(CFG, nb, schedules, T)
    out, infos = [], []
    for t in range(T):
        step_tokens = jnp.broadcast_to(tokens[:, M + t][:, None], (nb, schedules))
        lg, _, suffix, info = controlled_step(CFG, scfg, PARAMS, prefix, suffix, step_tokens,
                                              controls_per_step[t])
        out.append(lg)
        infos.append(info)
    return jnp.stack(out), infos


def test_dense_controls_are_bitwise_the_uncontrolled_step():
    dense = Controls(kappa=jnp.ones((B, K)), rho=jnp.ones((B, K)), bits=jnp.full((B, K), 16))
    for scfg in (QUEST, SparsityConfig(criterion="recency", sink_tokens=1, window_tokens=1),
                 SparsityConfig(criterion="relevancy", sink_tokens=1, window_tokens=1)):
        controlled, _ = _rollout(scfg, [dense] * T)
        plain, _ = _rollout(scfg, [None] * T)
        np.testing.assert_array_equal(np.asarray(controlled), np.asarray(plain))


def test_shared_prefix_equals_a_materialized_per_row_cache():
    got, _ = _rollout(QUEST, [None] * T)
    for b in range(B):
        n = int(LENGTHS[b])
        h, cache = prefill(CFG, PARAMS, TOKENS[b:b + 1, :n], jnp.array([n]), n + T)
        for t in range(T):
            ref, _, cache = decode_step(CFG, PARAMS, cache, TOKENS[b:b + 1, M + t])
            for k in range(K):
                np.testing.assert_allclose(got[t, b, k], ref[0], atol=2e-5, rtol=0)


def test_quest_step_attends_exactly_the_keys_quest_keeps_on_the_concatenated_cache():
    """Layer-0 kept-key counts equal quest_keep over a materialized cache of the same keys."""
    controls = [_controls(s) for s in range(T)]
    _, infos = _rollout(QUEST, controls)
    from soljax.lm import layers as L

    lp = jax.tree.map(lambda a: a[0], PARAMS["layers"])
    inv = L.rope_inv_freq(CFG)
    for b in range(B):
        n = int(LENGTHS[b])
        seq = jnp.concatenate([TOKENS[b, :n], TOKENS[b, M:M + T]])[None]
        x = PARAMS["embed"][seq]
        h = L.rms_norm(x, lp["attn_norm"], CFG.rms_norm_eps)
        q, kk, _ = L.project_qkv(lp, h, jnp.arange(seq.shape[1])[None], CFG, inv)
        for t in range(T):
            kv_len = n + t + 1
            # the keys of schedule k depend on its earlier actions only from layer 1 on: layer 0 is exact
            for k in range(K):
                keep = quest_keep(q[:, n + t], kk, jnp.array([kv_len]),
                                  jnp.array([controls[t].kappa[b, k]]), QUEST.page_size)
                expected = np.asarray(keep[0].sum(-1))
                if kv_len <= QUEST.min_effective_kv:
                    expected = np.full_like(expected, kv_len)
                np.testing.assert_array_equal(np.asarray(infos[t].kept_keys[b, k, 0]), expected)


@pytest.mark.parametrize("criterion", ["quest", "recency", "relevancy"])
def test_mixed_rows_equal_each_row_alone(criterion):
    scfg = SparsityConfig(criterion=criterion, page_size=4, sink_tokens=1, window_tokens=1)
    controls = [_controls(10 + s) for s in range(T)]
    together, _ = _rollout(scfg, controls)
    for b in range(B):
        for k in range(K):
            alone_controls = [Controls(*(a[b:b + 1, k:k + 1] for a in c)) for c in controls]
            alone, _ = _rollout(scfg, alone_controls, TOKENS[b:b + 1], LENGTHS[b:b + 1], 1)
            scale = float(jnp.abs(alone).max())  # fp32 across batch shapes: ~1e-6 of the logit scale
            np.testing.assert_allclose(together[:, b, k], alone[:, 0, 0], atol=2e-6 * scale, rtol=0)


def test_non_effective_steps_run_dense():
    scfg = SparsityConfig(page_size=4, sink_tokens=4, window_tokens=2)  # effective iff kv_len > 7
    short = jnp.array([3, 3])
    tight = Controls(kappa=jnp.full((B, K), 0.1), rho=jnp.full((B, K), 0.4), bits=jnp.full((B, K), 4))
    got, infos = _rollout(scfg, [tight] * T, lengths=short)
    dense, _ = _rollout(scfg, [None] * T, lengths=short)
    for t in range(T):
        eff = 3 + t + 1 > 7
        assert bool(infos[t].effective.all()) == eff and bool(infos[t].effective.any()) == eff
        if not eff:
            np.testing.assert_array_equal(np.asarray(got[t]), np.asarray(dense[t]))
    assert not np.allclose(np.asarray(got[-1]), np.asarray(dense[-1]))


def test_per_schedule_state_grows_with_T_not_with_the_context():
    _, prefix = prefill_shared(CFG, QUEST, PARAMS, TOKENS[:, :M], LENGTHS)
    assert prefix.k.shape == (CFG.num_layers, B, M, CFG.num_kv_heads, CFG.head_dim)
    assert prefix.kmax.shape == (CFG.num_layers, B, -(-M // 4), CFG.num_kv_heads, CFG.head_dim)
    suffix = SuffixCache.empty(CFG, B, K, T)
    assert suffix.k.shape == (CFG.num_layers, B, K, T, CFG.num_kv_heads, CFG.head_dim)
    step_tokens = jnp.zeros((B, K), jnp.int32)
    out = jax.eval_shape(lambda p, s: controlled_step(CFG, QUEST, PARAMS, p, s, step_tokens, _controls(0)),
                         prefix, suffix)
    assert out[2].k.shape == suffix.k.shape  # the step keeps the per-schedule state at T entries
    for leaf in jax.tree.leaves(prefix):
        assert K not in leaf.shape[1:2]  # nothing of the prefix is tiled over schedules


def test_run_schedules_matches_stepwise_rollout_and_scores_the_true_token():
    controls = [_controls(20 + s) for s in range(T)]
    per_step, infos = _rollout(QUEST, controls, lengths=jnp.array([M, M]))
    kappa, rho, bits = (jnp.stack([getattr(c, f) for c in controls], axis=-1) for f in Controls._fields)
    scores = run_schedules(CFG, QUEST, PARAMS, TOKENS, kappa, rho, bits, M)
    logp = jax.nn.log_softmax(per_step, axis=-1)
    for t in range(T):
        want = logp[t, jnp.arange(B)[:, None], jnp.arange(K)[None, :], TOKENS[:, M + t + 1][:, None]]
        np.testing.assert_allclose(scores.logprobs[:, :, t], want, atol=1e-5)
        np.testing.assert_allclose(scores.attended[:, :, t], infos[t].attended, atol=1e-6)
    assert scores.hidden.shape == (B, K, T, CFG.hidden_size)


@pytest.mark.parametrize("kwargs, needle", [
    ({"criterion": "topk"}, "criterion"), ({"page_size": 0}, "page_size"),
    ({"sink_tokens": -1}, "sink_tokens"), ({"relevancy_tier": "global"}, "relevancy_tier"),
])
def test_bad_sparsity_config(kwargs, needle):
    with pytest.raises(SoljaxError, match=needle):
        SparsityConfig(**kwargs)


def test_copied_prefix_engine_gives_the_same_rollout():
    from soljax.compress.actions import ActionGrid
    from soljax.control import GivenActions
    from soljax.engine.rollout import rollout

    grid = ActionGrid(keep_fracs=(0.2, 1.0), struct_prune_choices=("s50", "s100"), quant_choices=("q4", "q16"))
    actions = jax.random.randint(jax.random.PRNGKey(5), (B, K, T), 0, grid.num_actions)
    kw = dict(context_len=M, schedules=K, dense_kl=True)
    shared = rollout(CFG, QUEST, PARAMS, TOKENS, jnp.ones((B, 3)), GivenActions(grid), actions, jax.random.PRNGKey(0), **kw)
    copied = rollout(CFG, QUEST, PARAMS, TOKENS, jnp.ones((B, 3)), GivenActions(grid), actions, jax.random.PRNGKey(0),
                     copy_prefix=True, **kw)
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(copied)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


def test_engine_with_k_schedules_equals_a_loop_over_schedules():
    from soljax.compress.actions import ActionGrid
    from soljax.control import GivenActions
    from soljax.engine.rollout import rollout

    grid = ActionGrid(keep_fracs=(0.2, 1.0), struct_prune_choices=("s50", "s100"), quant_choices=("q4", "q16"))
    actions = jax.random.randint(jax.random.PRNGKey(6), (B, K, T), 0, grid.num_actions)
    targets = jnp.array([[0.5, 0.7, 0.6], [0.3, 0.9, 0.4]])
    run = lambda acts, k: rollout(CFG, QUEST, PARAMS, TOKENS, targets, GivenActions(grid), acts,  # noqa: E731
                                  jax.random.PRNGKey(0), context_len=M, schedules=k)
    together = run(actions, K)
    for k in range(K):
        alone = run(actions[:, k:k + 1], 1)
        for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
            if a.ndim >= 3 and a.shape[1] == K:
                np.testing.assert_allclose(np.asarray(a[:, k:k + 1]), np.asarray(b), atol=2e-5, rtol=0)
    # the usage features the policy sees are the running means of the applied actions
    usage = np.asarray(together.usage)
    scal = np.asarray(together.scalars)
    np.testing.assert_allclose(scal[:, :, 0, 5:], 0.0, atol=1e-7)  # no earlier step: dev = 0
    expected_dev = usage[:, :, :3].mean(2) - np.asarray(targets)[:, None, :]
    np.testing.assert_allclose(scal[:, :, 3, 5:], expected_dev, atol=1e-6)
