"""Streaming conversion: tensors are read a block of rows at a time and cast per block into a tree
held only in the target dtype; the result equals the whole-tensor conversion bit for bit.

The HF directories are written by hand (safetensors from ``params_to_hf``) and the GGUF file with
``gguf.GGUFWriter``, so nothing here needs torch.
"""

from __future__ import annotations

import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from soljax.lm import keymap
from soljax.lm.config import LMConfig
from soljax.lm.gguf_io import GGUFTensors, open_gguf, unpermute_rows
from soljax.lm.keymap import hf_to_params, params_to_hf
from soljax.lm.params import param_shapes
from soljax.lm.safetensors_io import SafetensorsDir

BF16 = np.dtype(ml_dtypes.bfloat16)


def _hf_dir(path, cfg: LMConfig, seed: int = 0, shards: int = 2):
    """A Hugging Face directory's safetensors (``shards`` files) of random parameters; returns
    the parameters (float32 numpy, drawn with numpy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s, dtype=np.float32), param_shapes(cfg),
                          is_leaf=lambda s: isinstance(s, tuple))
    tensors = params_to_hf(cfg, params)
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for k in range(shards):
        save_file({n: np.ascontiguousarray(tensors[n]) for n in names[k::shards]},
                  str(path / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"))
    return params


class Recording:
    """A tensor source that records every block read (key, start, stop, float32 bytes)."""

    def __init__(self, source):
        self.source, self.reads = source, []

    def keys(self):
        return self.source.keys()

    def shape(self, key):
        return self.source.shape(key)

    def rows(self, key, start, stop):
        block = self.source.rows(key, start, stop)
        self.reads.append((key, start, stop, 4 * block.size))
        return block


CFG = LMConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, qkv_bias=True, tie_word_embeddings=False)


def test_tensors_are_read_and_cast_a_block_at_a_time(tmp_path, monkeypatch):
    params = _hf_dir(tmp_path, CFG)
    block = 4 * 32 * 5  # five rows of a [*, 32] tensor
    monkeypatch.setattr(keymap, "BLOCK_BYTES", block)
    source = Recording(SafetensorsDir(tmp_path))
    got = hf_to_params(CFG, source, BF16)
    # every leaf is built in the target dtype and equals the float32 parameters cast once
    for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
        assert x.dtype == BF16, jax.tree_util.keystr(path)
    expected = jax.tree.map(lambda x: x.astype(BF16), params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert a.shape == b.shape and a.tobytes() == b.tobytes()
    # no block is larger than BLOCK_BYTES of float32 (or one row), and each tensor is covered in order
    by_key: dict[str, list] = {}
    for key, start, stop, nbytes in source.reads:
        row = 4 * int(np.prod(source.shape(key)[1:]))
        assert nbytes <= max(block, row), (key, start, stop)
        by_key.setdefault(key, []).append((start, stop))
    for key, spans in by_key.items():
        assert spans[0][0] == 0 and spans[-1][1] == source.shape(key)[0]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), key
    assert len(by_key["model.embed_tokens.weight"]) == -(-96 // 5)  # 96 rows of 32, 5 at a time
    # the transposed matrices too (HF [out, in] rows become our columns)
    assert len(by_key["model.layers.0.mlp.down_proj.weight"]) > 1


def test_import_never_holds_the_float32_model(tmp_path, monkeypatch):
    """numpy reports its buffers to tracemalloc: the peak while building a bfloat16 tree is about
    the tree's own size, far below the float32 model the whole-tensor import held."""
    cfg = LMConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
    _hf_dir(tmp_path, cfg, shards=3)
    monkeypatch.setattr(keymap, "BLOCK_BYTES", 64 * 1024)
    source = SafetensorsDir(tmp_path)
    tracemalloc.start()
    try:
        tree = hf_to_params(cfg, source, BF16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bf16_bytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    assert bf16_bytes == 2 * sum(x.size for x in jax.tree.leaves(tree))
    assert peak >= bf16_bytes  # tracemalloc sees numpy's buffers
    assert peak < bf16_bytes + 4 * 64 * 1024 + 2**20, (peak, bf16_bytes)  # tree + a block or two + slack
    assert peak < 0.6 * 2 * bf16_bytes  # the float32 model alone would be twice the tree


def test_gguf_blocks_equal_whole_tensors(tmp_path):
    """Blocks of a GGUF tensor, quantized or not, whatever their boundaries, equal the slices of
    the whole dequantized tensor; llama's interleaved Q/K rows are undone per whole head."""
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    D, Hq, Hkv, Dh = 64, 4, 2, 8
    q = rng.standard_normal((Hq * Dh, D)).astype(np.float32)
    k = rng.standard_normal((Hkv * Dh, D)).astype(np.float32)
    up = rng.standard_normal((48, D)).astype(np.float32)
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", quantize(q, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_k.weight", k)
    w.add_tensor("blk.0.ffn_up.weight", up)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = LMConfig(vocab_size=8, hidden_size=D, intermediate_size=48, num_layers=1, num_heads=Hq, num_kv_heads=Hkv,
                   head_dim=Dh)
    tensors = GGUFTensors(open_gguf(path), cfg)
    q_stored = dequantize(quantize(q, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    whole = {"model.layers.0.self_attn.q_proj.weight": unpermute_rows(q_stored, Hq),
             "model.layers.0.self_attn.k_proj.weight": unpermute_rows(k, Hkv),
             "model.layers.0.mlp.up_proj.weight": up}
    for name, want in whole.items():
        assert tensors.shape(name) == want.shape
        assert np.array_equal(tensors[name], want), name
        for start, stop in [(0, 3), (3, 11), (5, 6), (11, want.shape[0])]:
            got = tensors.rows(name, start, stop)
            assert got.dtype == np.float32 and np.array_equal(got, want[start:stop]), (name, start, stop)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_block_size_does_not_change_the_result(tmp_path, monkeypatch, dtype):
    params = _hf_dir(tmp_path, CFG, seed=1, shards=1)
    whole = hf_to_params(CFG, SafetensorsDir(tmp_path), dtype)
    monkeypatch.setattr(keymap, "BLOCK_BYTES", 4)  # one row at a time
    rows = hf_to_params(CFG, SafetensorsDir(tmp_path), dtype)
    from_arrays = hf_to_params(CFG, params_to_hf(CFG, params), dtype)  # a plain mapping of arrays
    for a, b, c in zip(jax.tree.leaves(whole), jax.tree.leaves(rows), jax.tree.leaves(from_arrays)):
        assert a.dtype == np.dtype(dtype) and a.tobytes() == b.tobytes() == c.tobytes()
