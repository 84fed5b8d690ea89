"""Implementation selection for soljax's sparse decode ops: ``impl`` is ``xla``, ``pallas`` or ``cpu``.

``xla`` runs the pure-JAX reference of each op, which gathers only the selected pages / channels
(a real saving when the selection capacity is smaller than the cache or the layer). ``pallas``
runs the kernel for the backend: Triton on GPU, Mosaic on TPU. On CPU Pallas only runs interpreted
(``interpret=True``); ``kernel`` then chooses which kernel to interpret (``gpu`` or ``tpu``,
default ``gpu``), and may also force one on an accelerator. ``cpu`` runs the C++ kernels:
the attention's (:mod:`soljax.kernels.quest_attention_cpu`), which reads the pages in place, and
the MLP's (:mod:`soljax.kernels.swiglu_cpu`), which reads the weight rows of the kept input
channels in place.
"""

from __future__ import annotations

import jax

from soljax.errors import SoljaxError
from soljax.kernels import quest_attention, sparse_mlp

IMPLS = ("xla", "pallas")
ATTENTION_IMPLS = MLP_IMPLS = IMPLS + ("cpu",)
KERNELS = ("gpu", "tpu")


def check_impl(name: str, impl: str, impls: tuple[str, ...] = IMPLS) -> str:
    if impl not in impls:
        raise SoljaxError(f"{name} must be one of {impls}, got {impl!r}")
    return impl


def kernel_flavour(interpret: bool, kernel: str | None = None) -> str:
    """Which Pallas kernel runs: ``gpu`` (Triton) or ``tpu`` (Mosaic)."""
    if kernel is not None:
        if kernel not in KERNELS:
            raise SoljaxError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        return kernel
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    if not interpret:
        raise SoljaxError(f"Pallas kernels need a GPU or TPU (backend is {backend!r}); use impl 'xla' "
                          "or run them interpreted")
    return "gpu"


def quest_decode_attention(q, k_prefix, v_prefix, *args, page_size: int, impl: str = "xla", interpret: bool = False,
                           kernel: str | None = None, layer=None):
    """Page-sparse decode attention (contract: :mod:`soljax.kernels.quest_attention`). ``layer``:
    the prefix caches hold every layer (``[L, B, M, Hkv, Dh]``) and this one is read (in place by
    the ``cpu`` kernel, sliced for the others)."""
    if check_impl("attention impl", impl, ATTENTION_IMPLS) == "cpu":
        from soljax.kernels.quest_attention_cpu import quest_decode_attention_cpu

        return quest_decode_attention_cpu(q, k_prefix, v_prefix, *args, page_size=page_size, layer=layer)
    if layer is not None:
        k_prefix, v_prefix = k_prefix[layer], v_prefix[layer]
    args = (q, k_prefix, v_prefix, *args)
    if impl == "xla":
        return quest_attention.quest_decode_attention_reference(*args, page_size=page_size)
    if kernel_flavour(interpret, kernel) == "tpu":
        from soljax.kernels.quest_attention_tpu import quest_decode_attention_tpu as fn
    else:
        from soljax.kernels.quest_attention_gpu import quest_decode_attention_gpu as fn
    return fn(*args, page_size=page_size, interpret=interpret)


def sparse_gate_up(x, w_gate, w_up, channels, num_channels, *, impl: str = "xla", interpret: bool = False,
                   kernel: str | None = None):
    """Channel-gathered gate/up projection (contract: :mod:`soljax.kernels.sparse_mlp`)."""
    if check_impl("mlp impl", impl) == "xla":
        return sparse_mlp.sparse_gate_up_reference(x, w_gate, w_up, channels, num_channels)
    if kernel_flavour(interpret, kernel) == "tpu":
        from soljax.kernels.sparse_mlp_tpu import sparse_gate_up_tpu as fn
    else:
        from soljax.kernels.sparse_mlp_gpu import sparse_gate_up_gpu as fn
    return fn(x, w_gate, w_up, channels, num_channels, interpret=interpret)


def down_fake_quant(a, w_down, bits, *, impl: str = "xla", interpret: bool = False, kernel: str | None = None):
    """Down projection with per-row fake quantization (contract: :mod:`soljax.kernels.sparse_mlp`)."""
    if check_impl("mlp impl", impl) == "xla":
        return sparse_mlp.down_fake_quant_reference(a, w_down, bits)
    if kernel_flavour(interpret, kernel) == "tpu":
        from soljax.kernels.sparse_mlp_tpu import down_fake_quant_tpu as fn
    else:
        from soljax.kernels.sparse_mlp_gpu import down_fake_quant_gpu as fn
    return fn(a, w_down, bits, interpret=interpret)
