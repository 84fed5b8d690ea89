"""``soljax bench convert`` (the benchmark itself is too big for the suite; docs/benchmarks.md has
its output): the synthetic models have the real models' parameter counts, and the writer's
checkpoint converts."""

from __future__ import annotations

import math

import jax
import numpy as np

from soljax.lm.convert import convert
from soljax.lm.checkpoint import load_model
from soljax.tools.bench_convert import SHAPES, hf_tensor_shapes, peak_rss_bytes, write_synthetic_llama


def test_synthetic_shapes_have_the_real_parameter_counts():
    counts = {name: sum(math.prod(s) for s in hf_tensor_shapes(hf).values()) for name, hf in SHAPES.items()}
    assert counts == {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824}


def test_synthetic_checkpoint_is_sharded_and_converts(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny", dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            tie_word_embeddings=True))
    info = write_synthetic_llama(tmp_path / "hf", "tiny", shard_bytes=4 * 64 * 32)
    assert info["shards"] > 2 and info["largest_tensor"] == "model.embed_tokens.weight"
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) == info["shards"]
    cfg = convert(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", quiet=True)
    got_cfg, params, _ = load_model(tmp_path / "out")
    assert got_cfg == cfg and cfg.dtype == "bfloat16" and cfg.num_layers == 2
    assert sum(x.size for x in jax.tree.leaves(params)) == info["parameters"]
    assert np.all(np.asarray(params["final_norm"], np.float32) == 1.0)
    assert peak_rss_bytes() > 10**7  # this process's high-water mark, in bytes
