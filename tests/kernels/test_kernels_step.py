"""The controlled decode step with ``attention_impl``/``mlp_impl`` = ``pallas`` (interpreted on CPU)
equals the masked XLA step: same QUEST pages, pruned channels and bits, same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.errors import SoljaxError
from soljax.lm import LMConfig, init_params
from soljax.lm.controlled import Controls, SparsityConfig, SuffixCache, controlled_step, prefill_shared

CFG = LMConfig(vocab_size=61, hidden_size=40, intermediate_size=48, num_layers=2, num_heads=6,
               num_kv_heads=2, head_dim=16)
PARAMS = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
B, K, M, T = 2, 2, 27, 3
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (B, M + T), 0, CFG.vocab_size)
LENGTHS = jnp.array([M, 18])


def _rollout(scfg, controls):
    _, prefix = prefill_shared(CFG, scfg, PARAMS, TOKENS[:, :M], LENGTHS)
    suffix = SuffixCache.empty(CFG, B, K, T)
    logits, kept = [], []
    for t in range(T):
        step = jnp.broadcast_to(TOKENS[:, M + t][:, None], (B, K))
        lg, _, suffix, info = controlled_step(CFG, scfg, PARAMS, prefix, suffix, step, controls[t])
        logits.append(lg)
        kept.append(info.kept_keys)
    return np.asarray(jnp.stack(logits)), np.asarray(jnp.stack(kept))


def test_pallas_step_equals_the_masked_xla_step(controlled=True):
    rng = np.random.default_rng(0)
    controls = [Controls(kappa=jnp.asarray(rng.choice([0.1, 0.3, 1.0], (B, K)), jnp.float32),
                         rho=jnp.asarray(rng.choice([0.4, 0.7, 1.0], (B, K)), jnp.float32),
                         bits=jnp.asarray(rng.choice([3, 5, 16], (B, K)), jnp.int32))
                if controlled else None for _ in range(T)]
    xla = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1)
    pallas = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1, attention_impl="pallas",
                            mlp_impl="pallas", kernel_interpret=True)
    want, kept_want = _rollout(xla, controls)
    got, kept_got = _rollout(pallas, controls)
    np.testing.assert_array_equal(kept_got, kept_want)
    if controlled:
        assert (kept_want[-1] < (LENGTHS[:, None, None, None] + T)).any()  # some heads really skipped pages
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kwargs, needle", [
    ({"attention_impl": "triton"}, "attention_impl"), ({"mlp_impl": "cuda"}, "mlp_impl"),
    ({"attention_impl": "pallas", "criterion": "recency"}, "quest"), ({"kernel_interpret": 1}, "kernel_interpret"),
])
def test_bad_impl_config(kwargs, needle):
    with pytest.raises(SoljaxError, match=needle):
        SparsityConfig(**kwargs)
