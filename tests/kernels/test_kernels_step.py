"""The controlled decode step with ``attention_impl``/``mlp_impl`` = ``pallas`` (interpreted on CPU)
equals the masked XLA step: same QUEST pages, pruned channels and bits, same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.errors import SoljaxError
from soljax.lm import LMConfig, init_params
from soljax.lm.controlled import Controls, SparsityConfig, SuffixCache, controlled_step, prefill_shared
from soljax.lm.fast_step import FastPath, Levels, fast_step

CFG = LMConfig(vocab_size=61, hidden_size=40, intermediate_size=48, num_layers=2, num_heads=6,
               num_kv_heads=2, head_dim=16)
PARAMS = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
B, K, M, T = 2, 2, 27, 3
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (B, M + T + 1), 0, CFG.vocab_size)  # up to T + 1 steps
LENGTHS = jnp.array([M, 18])


def _rollout(scfg, controls, step_fn=controlled_step, schedules=K):
    _, prefix = prefill_shared(CFG, scfg, PARAMS, TOKENS[:, :M], LENGTHS)
    suffix = SuffixCache.empty(CFG, B, schedules, len(controls))
    logits, kept = [], []
    for t in range(len(controls)):
        step = jnp.broadcast_to(TOKENS[:, M + t][:, None], (B, schedules))
        lg, _, suffix, info = step_fn(CFG, scfg, PARAMS, prefix, suffix, step, controls[t])
        logits.append(lg)
        kept.append(info.kept_keys)
    return np.asarray(jnp.stack(logits)), np.asarray(jnp.stack(kept))


@pytest.mark.parametrize("attention, mlp", [("pallas", "pallas"), ("cpu", "xla"), ("cpu", "cpu")])
def test_kernel_step_equals_the_masked_xla_step(attention, mlp, controlled=True):
    rng = np.random.default_rng(0)
    controls = [Controls(kappa=jnp.asarray(rng.choice([0.1, 0.3, 1.0], (B, K)), jnp.float32),
                         rho=jnp.asarray(rng.choice([0.4, 0.7, 1.0], (B, K)), jnp.float32),
                         bits=jnp.asarray(rng.choice([3, 5, 16], (B, K)), jnp.int32))
                if controlled else None for _ in range(T)]
    xla = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1)
    kernels = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1, attention_impl=attention,
                             mlp_impl=mlp, kernel_interpret=True)
    want, kept_want = _rollout(xla, controls)
    got, kept_got = _rollout(kernels, controls)
    np.testing.assert_array_equal(kept_got, kept_want)
    if controlled:
        assert (kept_want[-1] < (LENGTHS[:, None, None, None] + T)).any()  # some heads really skipped pages
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("attention, mlp", [("pallas", "pallas"), ("cpu", "cpu")])
def test_fast_step_on_the_kernels_equals_the_masked_xla_step(attention, mlp):
    """The fast decode path's branches call the kernels (the Pallas attention and MLP, or the C++
    attention): rows at different levels, levels changing every step, a dense row beside a sparse
    one, values off the levels, and every row dense."""
    actions = [[(0.1, 0.4, 3), (0.3, 0.7, 5)], [(1.0, 1.0, 16), (0.1, 0.4, 16)], [(0.2, 0.55, 4), (0.3, 1.0, 3)],
               [(1.0, 1.0, 16), (1.0, 1.0, 16)]]
    controls = [Controls(*(jnp.asarray(v, dt).reshape(B, 1) for v, dt in
                           zip(zip(*step), (jnp.float32, jnp.float32, jnp.int32)))) for step in actions]
    scfg = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1)
    path = FastPath(Levels.of([0.1, 0.3], [0.4, 0.7], [3, 5]), mlp=mlp, attention_impl=attention, interpret=True)
    want, kept_want = _rollout(scfg, controls, schedules=1)
    got, kept_got = _rollout(scfg, controls, lambda *a: fast_step(a[0], a[1], path, *a[2:]), schedules=1)
    np.testing.assert_array_equal(kept_got, kept_want)
    assert (kept_want[0] < (LENGTHS[:, None, None, None] + 1)).any()  # the first step's rows skipped pages
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kwargs, needle", [
    ({"attention_impl": "triton"}, "attention_impl"), ({"mlp_impl": "cuda"}, "mlp_impl"),
    ({"attention_impl": "pallas", "criterion": "recency"}, "quest"), ({"kernel_interpret": 1}, "kernel_interpret"),
    ({"attention_impl": "cpu", "criterion": "relevancy"}, "quest"),
])
def test_bad_impl_config(kwargs, needle):
    with pytest.raises(SoljaxError, match=needle):
        SparsityConfig(**kwargs)
