"""The joint action grid: enumeration order, tags, dense action, costs, controls and config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.compress import ActionGrid
from soljax.errors import SoljaxError

VMAX = dict(keep_fracs=[round(0.1 * i, 1) for i in range(1, 11)],
            struct_prune_choices=[f"s{p}" for p in range(40, 101, 5)],
            quant_choices=[f"q{b}" for b in range(5, 17)])


def test_vmax_grid_size_and_order():
    g = ActionGrid(**VMAX)
    assert g.shape == (10, 13, 12)
    assert len(g) == g.num_actions == 1560
    assert g.bos_id == 1560
    P, Q = 13, 12
    for i_k, i_p, i_q in [(0, 0, 0), (3, 7, 5), (9, 12, 11), (4, 0, 11)]:
        idx = i_k * P * Q + i_p * Q + i_q
        assert g.index(i_k, i_p, i_q) == idx
        assert g.unravel(idx) == (i_k, i_p, i_q)
        assert g.kappa[idx] == np.float32(VMAX["keep_fracs"][i_k])
        assert g.rho[idx] == np.float32((40 + 5 * i_p) / 100)
        assert g.bits[idx] == 5 + i_q
    assert g.tags[0] == "k010-s040-q5"
    assert g.tags[1] == "k010-s040-q6"
    assert g.tags[12] == "k010-s045-q5"
    assert g.tags[156] == "k020-s040-q5"
    assert g.tags[-1] == "k100-s100-q16"
    assert g.dense_idx == 1559
    assert len(set(g.tags)) == 1560


def test_float32_values_and_dtypes():
    g = ActionGrid(keep_fracs=[0.1, 0.3, 1.0], struct_prune_choices=["s45", "s100"],
                   quant_choices=["q5", "q16"])
    assert g.kappa.dtype == np.float32 and g.rho.dtype == np.float32 and g.bits.dtype == np.int32
    assert float(g.kappa[0]) == 0.10000000149011612
    assert float(g.rho[0]) == float(np.float32(0.45))
    assert not g.kappa.flags.writeable


def test_small_grid_enumeration_and_tags():
    g = ActionGrid(keep_fracs=[0.3, 1.0], struct_prune_choices=["s60", "s100"],
                   quant_choices=["q5", "q16"])
    assert list(g.tags) == ["k030-s060-q5", "k030-s060-q16", "k030-s100-q5", "k030-s100-q16",
                            "k100-s060-q5", "k100-s060-q16", "k100-s100-q5", "k100-s100-q16"]
    assert g.dense_idx == 7
    assert g.num_distinct == {"token": 2, "prune": 2, "quant": 2}


def test_dense_idx_rules():
    # exact dense action present, not last: the first one wins
    assert ActionGrid(keep_fracs=[1.0, 0.5], struct_prune_choices=["s100", "s50"],
                      quant_choices=["q16", "q4"]).dense_idx == 0
    g = ActionGrid(keep_fracs=[0.5, 1.0], struct_prune_choices=["s50", "s100"],
                   quant_choices=["q4", "q16"])
    assert g.dense_idx == g.index(1, 1, 1) == 7
    # no (1, 1, 16): first action with kappa 1
    g = ActionGrid(keep_fracs=[0.5, 1.0], struct_prune_choices=["s50", "s80"], quant_choices=["q8"])
    assert g.dense_idx == 2
    # no kappa 1 at all: 0
    assert ActionGrid(keep_fracs=[0.5, 0.7]).dense_idx == 0


def test_defaults_single_axis():
    g = ActionGrid(keep_fracs=[0.2, 0.5, 1.0])
    assert g.shape == (3, 1, 1)
    assert list(g.tags) == ["k020-s100-q16", "k050-s100-q16", "k100-s100-q16"]
    assert g.active_axes() == {"token": True, "prune": False, "quant": False}
    assert g.penalty_weights(100.0, 100.0, 200.0) == (100.0, 0.0, 0.0)


def test_costs():
    g = ActionGrid(keep_fracs=[0.1, 1.0], struct_prune_choices=["s40", "s80"],
                   quant_choices=["q5", "q8", "q16"])
    np.testing.assert_array_equal(g.token_cost, g.kappa)
    assert g.rho_max == pytest.approx(0.8)
    np.testing.assert_allclose(g.prune_cost, g.rho / np.float32(0.8), rtol=1e-7)
    assert g.prune_cost.max() == 1.0
    np.testing.assert_array_equal(g.quant_cost, g.bits / np.float32(16))
    assert float(g.quant_cost[0]) == 0.3125
    assert g.penalty_weights(1.0, 2.0, 3.0) == (1.0, 2.0, 3.0)


def test_controls_and_usage_gather_under_jit():
    g = ActionGrid(**VMAX)
    ids = jnp.asarray([[0, 1559], [777, g.dense_idx]])
    kappa, rho, bits = jax.jit(g.controls)(ids)
    assert kappa.dtype == jnp.float32 and rho.dtype == jnp.float32 and bits.dtype == jnp.int32
    np.testing.assert_array_equal(kappa, g.kappa[np.asarray(ids)])
    np.testing.assert_array_equal(rho, g.rho[np.asarray(ids)])
    np.testing.assert_array_equal(bits, g.bits[np.asarray(ids)])
    tok, pru, q = g.usage(ids)
    np.testing.assert_array_equal(q, g.bits[np.asarray(ids)] / np.float32(16))
    np.testing.assert_array_equal(tok, kappa)
    np.testing.assert_array_equal(pru, g.prune_cost[np.asarray(ids)])


def test_hashable_and_equal_by_config():
    a = ActionGrid(keep_fracs=[0.5, 1.0], struct_prune_choices=["s60", "s100"])
    b = ActionGrid(keep_fracs=(0.5, 1.0), struct_prune_choices=("s60", "s100"))
    assert a == b and hash(a) == hash(b)
    assert a != ActionGrid(keep_fracs=[1.0, 0.5], struct_prune_choices=["s60", "s100"])

    @jax.jit
    def f(ids):
        return a.controls(ids)[0]

    np.testing.assert_array_equal(f(jnp.arange(4)), a.kappa)


def test_case_and_space_tolerant_like_the_reference():
    g = ActionGrid(keep_fracs=[1.0], struct_prune_choices=[" S60 "], quant_choices=["Q8"])
    assert g.tags == ("k100-s060-q8",)


@pytest.mark.parametrize("kwargs, message", [
    (dict(struct_prune_choices=["s140"]), "out of range"),
    (dict(struct_prune_choices=["s0"]), "out of range"),
    (dict(struct_prune_choices=["x60"]), "malformed"),
    (dict(struct_prune_choices=["s"]), "malformed"),
    (dict(struct_prune_choices=["s60.5"]), "malformed"),
    (dict(struct_prune_choices=["s-10"]), "malformed"),
    (dict(struct_prune_choices=[60]), "not a string"),
    (dict(struct_prune_choices="s60"), "must be a list"),
    (dict(struct_prune_choices=[]), "empty"),
    (dict(struct_prune_choices=["s60", "s060"]), "duplicate"),
    (dict(quant_choices=["q1"]), "out of range"),
    (dict(quant_choices=["q17"]), "out of range"),
    (dict(quant_choices=["q"]), "malformed"),
    (dict(quant_choices=["b8"]), "malformed"),
    (dict(quant_choices=[]), "empty"),
    (dict(quant_choices=["q8", "q8"]), "duplicate"),
    (dict(keep_fracs=[0]), "not in (0, 1]"),
    (dict(keep_fracs=[0.0, 1.0]), "not in (0, 1]"),
    (dict(keep_fracs=[1.5]), "not in (0, 1]"),
    (dict(keep_fracs=[-0.1]), "not in (0, 1]"),
    (dict(keep_fracs=[float("nan")]), "not in (0, 1]"),
    (dict(keep_fracs=["0.5"]), "not a number"),
    (dict(keep_fracs=[True]), "not a number"),
    (dict(keep_fracs=[]), "empty"),
    (dict(keep_fracs=0.5), "must be a list"),
    (dict(keep_fracs=[0.5, 0.5]), "duplicate"),
])
def test_bad_config_raises_one_clear_error(kwargs, message):
    args = dict(keep_fracs=[0.5, 1.0], struct_prune_choices=["s60", "s100"],
                quant_choices=["q5", "q16"])
    args.update(kwargs)
    with pytest.raises(SoljaxError) as info:
        ActionGrid(**args)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    axis = next(iter(kwargs))
    assert text.startswith(axis)
