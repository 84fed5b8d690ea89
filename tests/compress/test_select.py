"""Sort-free top-k selection equals the sort-based threshold, ties and infinities included."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from soljax.compress.select import kth_largest_key, sortable_keys, top_k_mask


def _reference(x, k):
    thr = -np.sort(-x, axis=-1)[np.arange(x.shape[0]), k - 1]
    return x >= thr[:, None]


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 40)),
              elements=st.one_of(st.floats(-1e6, 1e6, width=32, allow_subnormal=False), st.sampled_from([0.0, -0.0, 1.5, -np.inf, np.inf]))),
       st.data())
def test_top_k_mask_matches_sorting(x, data):
    k = np.array([data.draw(st.integers(1, x.shape[1])) for _ in range(x.shape[0])], np.int32)
    np.testing.assert_array_equal(np.asarray(top_k_mask(jnp.asarray(x), jnp.asarray(k))), _reference(x, k))


def test_keys_preserve_order_and_merge_signed_zeros():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    keys = np.asarray(sortable_keys(jnp.asarray(x))).astype(np.int64)
    assert (np.diff(keys) >= 0).all() and keys[3] == keys[4] and (np.diff(np.delete(keys, 3)) > 0).all()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_kth_largest_key_with_ties(k):
    x = jnp.asarray([[5.0, 1.0, 5.0, 2.0, 2.0, 2.0, -1.0]])
    expected = np.sort(np.asarray(x)[0])[::-1][k - 1]
    assert kth_largest_key(sortable_keys(x), jnp.asarray([k]))[0] == sortable_keys(jnp.asarray([expected]))[0]
