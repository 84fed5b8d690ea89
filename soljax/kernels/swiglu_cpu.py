"""The SwiGLU MLP of a few decode rows as a C++ kernel for the CPU (``swiglu_cpu.cc``).

:func:`swiglu_cpu` computes :func:`soljax.lm.layers.mlp` of rows ``x [N, D]``, reading one
layer's weights in place from the stacked ``[L, D, F]`` / ``[L, F, D]`` arrays (no slice copy in
a layer loop) and only the rows of ``w_gate`` / ``w_up`` of input channels that are nonzero in
some row: an input pruned to a fraction rho of its channels (zeros elsewhere) reads about
``(2 rho + 1) / 3`` of the weights. float32 only; built on first use with the system's C++
compiler (:mod:`soljax.kernels.native`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soljax.errors import SoljaxError
from soljax.kernels import native
from soljax.kernels.quest_attention import HIGHEST

# Rows up to which the kernel runs; beyond, XLA's matmuls are faster (the kernel is a matrix-vector
# product per row at heart: at 8 rows it is on par with XLA, at 100 rows 18x slower).
MAX_ROWS = 8


def swiglu_reference(x_nd: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *, layer) -> jax.Array:
    """The same SwiGLU with XLA's matmuls, on the weights ``[L, D, F]`` / ``[L, F, D]`` at ``layer``."""
    gate = jnp.dot(x_nd, w_gate[layer], precision=HIGHEST)
    return jnp.dot(jax.nn.silu(gate) * jnp.dot(x_nd, w_up[layer], precision=HIGHEST), w_down[layer],
                   precision=HIGHEST)


def swiglu_cpu(x_nd: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *, layer=None) -> jax.Array:
    """``down(silu(x @ w_gate) * (x @ w_up))`` -> ``[N, D]``; weights ``[L, D, F]``, ``[L, D, F]``,
    ``[L, F, D]`` read at ``layer`` (a traced index), or one layer's ``[D, F]`` / ``[F, D]`` with
    ``layer`` None. More than :data:`MAX_ROWS` rows run XLA's matmuls instead."""
    if layer is None:
        w_gate, w_up, w_down, layer = w_gate[None], w_up[None], w_down[None], 0
    native.check_inputs("CPU MLP kernel", "mlp_impl 'xla' or 'pallas'", x=x_nd, w_gate=w_gate, w_up=w_up,
                        w_down=w_down)
    N, D = x_nd.shape
    L, _, F = w_gate.shape
    for name, a, shape in (("w_gate", w_gate, (L, D, F)), ("w_up", w_up, (L, D, F)), ("w_down", w_down, (L, F, D))):
        if a.shape != shape:
            raise SoljaxError(f"{name} has shape {a.shape}, expected {shape} for x of shape {x_nd.shape}")
    if N > MAX_ROWS:  # many rows: XLA's matmuls (the kernel streams the weights once per 64 rows)
        return swiglu_reference(x_nd, w_gate, w_up, w_down, layer=layer)
    target = native.register("swiglu_cpu.cc", "soljax_swiglu_rows_cpu")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((N, D), jnp.float32))(
        x_nd, w_gate, w_up, w_down, jnp.asarray(layer, jnp.int32).reshape(1))
