"""soljax.compress against the reference implementation's single-op fixtures.

``tests/fixtures/golden/reference_unit_fixtures.npz`` holds, for layers 0, 15 and 29 of two text blocks at
the first decode step (kv_len 257, page size 8): QUEST inputs with token budgets and keep masks for
seven kappas, MLP inputs/outputs with the pruned inputs for five rhos (and a per-row mixed case),
fake-quant of the MLP output for five bit widths (and mixed), and the whole patched MLP
(rho 0.6, 5 bits). Everything but the whole MLP is compared exactly (bit for bit); fake-quant may
differ only on an element that sits exactly on a rounding boundary. The fixture has no MLP
weights: the whole-MLP check takes them from the embedded model
and compares integer quantization codes, since the matmuls' fp32 summation order differs.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.compress import (
    fake_quant, page_summaries, prune_topk, quant_step, quest_keep, quest_page_budget,
    quest_token_budget,
)

from golden import UNIT as FIX

META = json.loads(str(FIX["meta_json"]))
LAYERS = META["layers"]
KAPPAS = META["kappas"]
RHOS = META["prune"]
BITS = META["bits"]
KV_LEN = META["kv_len"]
PAGE = META["page_size"]

quest_keep_jit = jax.jit(quest_keep, static_argnums=4)
fake_quant_jit = jax.jit(fake_quant)
prune_jit = jax.jit(prune_topk)


def quest_inputs(layer):
    q = FIX[f"quest_L{layer}_query"][:, :, 0]  # [2, 9, 1, 64] -> [R, Hq, Dh]
    k = FIX[f"quest_L{layer}_key"].transpose(0, 2, 1, 3)  # [R, Hkv, kv, Dh] -> [R, S, Hkv, Dh]
    assert FIX[f"quest_L{layer}_attn_mask_allowed"].all()
    R = q.shape[0]
    return q, k, np.full((R,), KV_LEN, np.int32)


def bits_equal(a, b):
    return np.asarray(a).view(np.uint32) == np.asarray(b).view(np.uint32)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kappa", KAPPAS)
def test_quest_budget_and_keep(layer, kappa):
    q, k, kv_len = quest_inputs(layer)
    kap = np.full(kv_len.shape, kappa, np.float32)
    budget = np.asarray(quest_token_budget(kap, kv_len))
    np.testing.assert_array_equal(budget, FIX[f"quest_L{layer}_kappa{kappa}_budget"])
    keep = np.asarray(quest_keep_jit(q, k, kv_len, kap, PAGE))
    ref = FIX[f"quest_L{layer}_kappa{kappa}_keep"]
    assert keep.shape == ref.shape
    np.testing.assert_array_equal(keep, ref)
    # every kept set is whole pages, as many as the page budget (the fixture has no ties)
    _, _, valid = page_summaries(k, kv_len, PAGE)
    n_pg = np.asarray(quest_page_budget(budget, PAGE, valid.sum(-1)))
    pages = keep[..., : (KV_LEN // PAGE) * PAGE].reshape(*keep.shape[:2], -1, PAGE)
    assert (pages.all(-1) | ~pages.any(-1)).all()
    assert (keep.reshape(*keep.shape[:2], -1).sum(-1) <= n_pg[:, None] * PAGE).all()


def test_quest_mixed_rows_match_single_kappa():
    """Rows with different kappas in one call reproduce each kappa's fixture row."""
    q, k, kv_len = quest_inputs(LAYERS[1])
    kap = np.asarray([KAPPAS[0], KAPPAS[3]], np.float32)
    keep = np.asarray(quest_keep_jit(q, k, kv_len, kap, PAGE))
    np.testing.assert_array_equal(keep[0], FIX[f"quest_L{LAYERS[1]}_kappa{KAPPAS[0]}_keep"][0])
    np.testing.assert_array_equal(keep[1], FIX[f"quest_L{LAYERS[1]}_kappa{KAPPAS[3]}_keep"][1])


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("rho", RHOS)
def test_prune(layer, rho):
    x = FIX[f"mlp_L{layer}_x"]  # [2, 1, 576]
    out = np.asarray(prune_jit(x, np.full((x.shape[0],), rho, np.float32)))
    assert bits_equal(out, FIX[f"mlp_L{layer}_pruned_x_rho{rho}"]).all()
    if rho == 1.0:
        assert bits_equal(out, x).all()


@pytest.mark.parametrize("layer", LAYERS)
def test_prune_mixed_rows(layer):
    x = FIX[f"mlp_L{layer}_x"]
    out = np.asarray(prune_jit(x, np.asarray([0.4, 1.0], np.float32)))
    assert bits_equal(out, FIX[f"mlp_L{layer}_pruned_x_rho_mixed_0.4_1.0"]).all()


def assert_quant_equal(x, bits, out, ref):
    """Bitwise equality, except elements whose x / s lies exactly on a .5 rounding boundary."""
    out, ref = np.asarray(out), np.asarray(ref)
    diff = ~bits_equal(out, ref)
    if diff.any():
        s = np.asarray(quant_step(x, bits))
        ratio = np.asarray(x, np.float32) / s
        on_boundary = np.abs(ratio - np.floor(ratio)) == 0.5
        assert on_boundary[diff].all(), f"{diff.sum()} elements differ off a rounding boundary"


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant(layer, bits):
    y = FIX[f"mlp_L{layer}_y"]
    b = np.full((y.shape[0],), bits, np.int32)
    out = fake_quant_jit(y, b)
    assert_quant_equal(y, b, out, FIX[f"mlp_L{layer}_fq_y_b{bits}"])
    if bits >= 16:
        assert bits_equal(out, y).all()


@pytest.mark.parametrize("layer", LAYERS)
def test_fake_quant_mixed_rows(layer):
    y = FIX[f"mlp_L{layer}_y"]
    b = np.asarray([5, 16], np.int32)
    assert_quant_equal(y, b, fake_quant_jit(y, b), FIX[f"mlp_L{layer}_fq_batched_y_b5_16"])


# ------------------------------------------------------------------ whole patched MLP (needs weights)


def quant_codes(v, bits):
    """Integer codes and the scale of a fake-quantized vector (its abs-max element is qmax * s)."""
    qmax = 2.0 ** (bits - 1) - 1
    s = np.abs(v).max(-1, keepdims=True) / qmax
    return np.round(v / s), s


@pytest.fixture(scope="module")
def mlp_weights(embedded_model):
    from soljax.lm import layers

    cfg, params, _ = embedded_model
    assert cfg.hidden_size == FIX[f"mlp_L{LAYERS[0]}_x"].shape[-1] and cfg.num_layers > max(LAYERS), \
        "the embedded model is not the fixture's model"
    fn = jax.jit(layers.mlp)
    return lambda layer, x: np.asarray(fn(jax.tree.map(lambda a: a[layer], params["layers"]),
                                          jnp.asarray(x)))


@pytest.mark.embedded
@pytest.mark.parametrize("layer", LAYERS)
def test_whole_patched_mlp(layer, mlp_weights):
    """fake_quant(mlp(prune_topk(x, 0.6)), 5) with the embedded model's weights for this layer."""
    x, y = FIX[f"mlp_L{layer}_x"], FIX[f"mlp_L{layer}_y"]
    dense = mlp_weights(layer, x)
    np.testing.assert_allclose(dense, y, rtol=0, atol=1e-6 * np.abs(y).max() + 1e-6)
    rows = x.shape[0]
    pre = mlp_weights(layer, prune_topk(x, np.full((rows,), 0.6, np.float32)))
    out = np.asarray(fake_quant(pre, np.full((rows,), 5, np.int32)))
    ref = FIX[f"mlp_L{layer}_out_rho0.6_b5"]
    ours_codes, s = quant_codes(out, 5)
    ref_codes, _ = quant_codes(ref, 5)
    ratio = pre / s
    near_boundary = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-3
    differ = ours_codes != ref_codes
    assert not (differ & ~near_boundary).any()
    assert differ.sum() <= 2
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
