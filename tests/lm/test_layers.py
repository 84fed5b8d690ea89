"""The LM's attention building blocks against a float64 NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from soljax.lm import layers as L
from soljax.lm.model import MASK_VALUE


def _reference(q, k_new, v_new, k, v, valid, own_valid):
    """Softmax attention in float64 of q [B, Hq, Dh] over the valid cache keys and the own key; a
    row with nothing valid attends every key uniformly (what a finite mask value gives)."""
    B, Hq, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = np.zeros((B, Hq, Dh))
    for b in range(B):
        for h in range(Hq):
            keys = np.concatenate([k[b, :, h // G], k_new[b, None, h // G]]).astype(np.float64)
            vals = np.concatenate([v[b, :, h // G], v_new[b, None, h // G]]).astype(np.float64)
            ok = np.concatenate([valid[b], [own_valid[b]]])
            logits = keys @ q[b, h].astype(np.float64) / np.sqrt(Dh)
            w = np.exp(logits - logits[ok].max()) * ok if ok.any() else np.ones(S + 1)
            out[b, h] = w @ vals / w.sum()
    return out


@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 4), (3, 1)])
def test_one_query_attention_equals_float64_softmax(Hq, Hkv):
    rng = np.random.default_rng(Hq * 10 + Hkv)
    B, S, Dh = 4, 37, 16
    q = rng.standard_normal((B, Hq, Dh)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, Hkv, Dh)).astype(np.float32) for _ in range(2))
    k_new, v_new = (rng.standard_normal((B, Hkv, Dh)).astype(np.float32) for _ in range(2))
    lengths = np.array([S, 20, 1, 0])
    valid = np.arange(S)[None, :] < lengths[:, None]
    own_valid = np.array([True, True, False, False])  # the last row sees nothing at all
    got = L.one_query_attention(*(jnp.asarray(a) for a in (q, k_new, v_new, k, v, valid, own_valid)), MASK_VALUE)
    assert got.shape == (B, Hq, Dh) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _reference(q, k_new, v_new, k, v, valid, own_valid), atol=2e-6)
