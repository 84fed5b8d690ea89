"""soljax.distributions: KL and entropy against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np

from soljax import distributions


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float64), rtol=1e-6, atol=1e-6)


def test_kl_categorical():
    p = jnp.log(jnp.array([0.5, 0.5]))
    q = jnp.log(jnp.array([0.25, 0.75]))
    # 0.5 ln 2 + 0.5 ln (2/3) = 0.5 ln (4/3)
    close(distributions.kl_categorical(p, q), 0.1438410362)
    close(distributions.kl_categorical(q, q), 0.0)
    # unnormalized logits are fine, and batched over leading axes
    close(distributions.kl_categorical(jnp.stack([p + 3.0, q]), jnp.stack([q - 1.0, q])), [0.1438410362, 0.0])
    # zero-probability entries of p contribute nothing and keep gradients finite
    p_masked = jnp.array([-jnp.inf, 0.0])
    close(distributions.kl_categorical(p_masked, jnp.zeros(2)), 0.6931471806)
    g = jax.grad(lambda a, b: distributions.kl_categorical(a, b), argnums=(0, 1))(p_masked, jnp.zeros(2))
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_entropy_categorical():
    close(distributions.entropy_categorical(jnp.zeros(4)), 1.3862943611)
    close(distributions.entropy_categorical(jnp.array([0.0, -jnp.inf])), 0.0)
