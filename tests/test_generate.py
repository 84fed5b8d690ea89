"""Dense generation: batching, greedy equivalence, EOS, sampling controls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.errors import SoljaxError
from soljax.generate import generate, sample_token
from soljax.lm import LMConfig, decode_step, init_params, logits, prefill

CFG = LMConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
               num_kv_heads=1, head_dim=8)
PARAMS = init_params(CFG, jax.random.PRNGKey(3), scale=0.3)
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 8, 4, 11, 13, 2], [20]]


def _greedy_reference(prompt, n):
    """Token-by-token greedy decoding of one prompt with no padding at all."""
    ids = jnp.array([prompt])
    h, cache = prefill(CFG, PARAMS, ids, jnp.array([len(prompt)]), len(prompt) + n)
    step = logits(CFG, PARAMS, h[:, -1])
    out = []
    for _ in range(n):
        tok = jnp.argmax(step, axis=-1)
        out.append(int(tok[0]))
        step, _, cache = decode_step(CFG, PARAMS, cache, tok)
    return out


def test_mixed_length_batch_equals_each_prompt_alone():
    batch = generate(CFG, PARAMS, PROMPTS, 12)
    for prompt, got in zip(PROMPTS, batch):
        assert got == generate(CFG, PARAMS, [prompt], 12)[0]
        assert got == _greedy_reference(prompt, 12)


def test_eos_stops_a_row_and_is_included():
    ref = _greedy_reference(PROMPTS[1], 12)
    eos = ref[4]
    first = ref.index(eos)
    out = generate(CFG, PARAMS, PROMPTS, 12, eos_ids=(eos,))
    assert out[1] == ref[: first + 1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    a = generate(CFG, PARAMS, PROMPTS, 8, temperature=1.0, seed=1)
    b = generate(CFG, PARAMS, PROMPTS, 8, temperature=1.0, seed=1)
    assert a == b
    assert generate(CFG, PARAMS, PROMPTS, 8, temperature=1.0, top_p=1e-6) == generate(CFG, PARAMS, PROMPTS, 8)


def test_top_p_keeps_only_the_nucleus():
    logits_bv = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = np.asarray(jax.vmap(lambda k: sample_token(logits_bv, k, 1.0, 0.7)[0])(keys))
    assert set(draws) == {0, 1}


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}])
def test_bad_arguments(kwargs):
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(SoljaxError):
        generate(CFG, PARAMS, PROMPTS, args.pop("max_new_tokens"), **args)
    with pytest.raises(SoljaxError):
        generate(CFG, PARAMS, [[]], 4)
