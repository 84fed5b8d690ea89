"""Sparse MLP kernels (channel-gathered gate/up, down projection + fake-quant epilogue) against the
pure-JAX references, natively (skipped without the accelerator) and interpreted on CPU.

Inputs are random (never zeros); weight rows of channels no row keeps are NaN (a kernel that reads
them fails), and the kernels' outputs start NaN-filled, so an unwritten element fails too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.compress.prune import prune_mask, prune_topk
from soljax.compress.quant import fake_quant
from soljax.kernels import ops
from soljax.kernels.sparse_mlp import (down_fake_quant_reference, round_half_even, sparse_gate_up_reference,
                                       union_channels)

# (R, D, F, rho per row): batch 1 and small batches, widths that are not powers of two
SHAPES = [(1, 48, 64, (0.3,)), (5, 40, 96, (0.2, 0.5, 0.1, 0.25, 0.3))]


def gate_up_case(shape, dtype, seed=0):
    R, D, F, rho = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((R, D)), dtype)
    keep = prune_mask(x, jnp.asarray(rho, jnp.float32))
    xp = prune_topk(x, jnp.asarray(rho, jnp.float32))
    channels, num = union_channels(keep)
    kept_rows = np.asarray(keep.any(0))[:, None]
    w = [jnp.asarray(np.where(kept_rows, 0.3 * rng.standard_normal((D, F)), np.nan), dtype) for _ in range(2)]
    return xp, w[0], w[1], channels, num


def assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any(), "unwritten (NaN) output elements or pruned weight rows read"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_references_equal_the_masked_mlp():
    xp, wg, wu, channels, num = gate_up_case(SHAPES[1], jnp.float32)
    mm = lambda a, b: jnp.dot(a, jnp.nan_to_num(b), precision="highest")  # noqa: E731 (no TF32 on GPUs)
    dense = jax.nn.silu(mm(xp, wg)) * mm(xp, wu)
    assert_close(sparse_gate_up_reference(xp, wg, wu, channels, num), dense, 1e-5)
    a = jnp.asarray(np.random.default_rng(1).standard_normal((5, 96)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((96, 40)), jnp.float32)
    bits = jnp.array([3, 16, 5, 8, 15])
    assert_close(down_fake_quant_reference(a, w, bits), fake_quant(mm(a, w), bits), 1e-5)


def test_round_half_even_equals_jnp_round_under_jit():
    y = jnp.concatenate([jnp.arange(-40, 40) * 0.5, jnp.array([0.49999997, -0.49999997, 2.5000002]),
                         jnp.asarray(np.random.default_rng(0).standard_normal(4096) * 300, jnp.float32)])
    np.testing.assert_array_equal(jax.jit(round_half_even)(y), jnp.round(y))


class SparseMlpCases:
    kernel = "gpu"
    interpret = False

    def setup_method(self):
        if not self.interpret and jax.default_backend() != self.kernel:
            pytest.skip(f"needs a {self.kernel.upper()}")

    @pytest.mark.parametrize("shape", SHAPES, ids=["batch1", "batch5"])
    def test_gate_up_float32(self, shape):
        args = gate_up_case(shape, jnp.float32)
        got = ops.sparse_gate_up(*args, impl="pallas", interpret=self.interpret, kernel=self.kernel)
        assert_close(got, sparse_gate_up_reference(*args), 1e-5)

    def test_gate_up_bfloat16(self):
        args = gate_up_case(SHAPES[1], jnp.bfloat16, seed=3)
        got = ops.sparse_gate_up(*args, impl="pallas", interpret=self.interpret, kernel=self.kernel)
        assert got.dtype == jnp.bfloat16
        assert_close(got, sparse_gate_up_reference(*args), 1e-2)

    @pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
    def test_down_fake_quant(self, dtype, rtol):
        rng = np.random.default_rng(4)
        R, F, D = 6, 64, 48
        a = jnp.asarray(rng.standard_normal((R, F)), dtype)
        w = jnp.asarray(0.2 * rng.standard_normal((F, D)), dtype)
        bits = jnp.array([2, 4, 16, 6, 9, 15])
        got = ops.down_fake_quant(a, w, bits, impl="pallas", interpret=self.interpret, kernel=self.kernel)
        want = down_fake_quant_reference(a, w, bits)
        if dtype == jnp.float32:
            assert_close(got, want, rtol)
        else:  # a bf16 tie in the unquantized output may round one step differently: compare the steps
            assert not np.isnan(np.asarray(got, np.float32)).any()
            step = np.abs(np.asarray(want, np.float32)).max(1, keepdims=True) / (2.0 ** (np.asarray(bits) - 1) - 1)[:, None]
            diff = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
            assert (diff <= 1.01 * step + rtol * np.abs(np.asarray(want, np.float32))).all()
            assert (diff <= rtol * np.abs(np.asarray(want, np.float32)).max()).mean() > 0.95


class TestSparseMlpGpu(SparseMlpCases):
    kernel = "gpu"


class TestSparseMlpGpuInterpret(SparseMlpCases):
    kernel = "gpu"
    interpret = True


class TestSparseMlpTpu(SparseMlpCases):
    kernel = "tpu"


class TestSparseMlpTpuInterpret(SparseMlpCases):
    kernel = "tpu"
    interpret = True


@pytest.mark.parametrize("shape", SHAPES + [(3, 40, 36, (1.0, 0.5, 1.0))])
def test_cpu_swiglu_reads_only_kept_rows_of_stacked_weights(shape):
    """The C++ MLP kernel on a pruned input equals the dense SwiGLU; the gate/up rows of channels no
    row keeps are NaN (never read), other layers of the stack differ, the layer index is traced;
    float64 NumPy is the reference. F = 36 takes the scalar tail of the vector loops."""
    from soljax.errors import SoljaxError
    from soljax.kernels.swiglu_cpu import swiglu_cpu

    xp, wg, wu, _, _ = gate_up_case(shape, jnp.float32, seed=3)
    R, D, F, _ = shape
    wd = jnp.asarray(0.3 * np.random.default_rng(4).standard_normal((F, D)), jnp.float32)
    stack = [jnp.stack([w * 2.0 + 1.0, w, -w]) for w in (wg, wu, wd)]  # layer 1 is the case's
    got = jax.jit(lambda l: swiglu_cpu(xp, *stack, layer=l))(1)
    x64, g64, u64, d64 = (np.nan_to_num(np.asarray(a, np.float64)) for a in (xp, wg, wu, wd))
    g, u = x64 @ g64, x64 @ u64
    want = (g / (1.0 + np.exp(-g)) * u) @ d64
    assert_close(got, want, 1e-5)
    with pytest.raises(SoljaxError, match="float32"):
        swiglu_cpu(xp.astype(jnp.bfloat16), wg, wu, wd)
    with pytest.raises(SoljaxError, match="w_down has shape"):
        swiglu_cpu(xp, wg, wu, wd.T)


def test_cpu_swiglu_of_many_rows_runs_xla():
    """Beyond MAX_ROWS rows the same function computes with XLA's matmuls (the kernel would stream
    the weights once per 64 rows, far slower); the result is the same SwiGLU."""
    from soljax.kernels.swiglu_cpu import MAX_ROWS, swiglu_cpu

    rng = np.random.default_rng(5)
    D, F = 24, 40
    x = jnp.asarray(rng.standard_normal((MAX_ROWS + 3, D)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((2, D, F)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((2, F, D)), jnp.float32)
    want = swiglu_cpu(x[:MAX_ROWS], wg, wu, wd, layer=1)  # the kernel
    got = swiglu_cpu(x, wg, wu, wd, layer=1)
    assert_close(got[:MAX_ROWS], want, 1e-5)
