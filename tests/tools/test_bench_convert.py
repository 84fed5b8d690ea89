"""``soljax bench convert`` (the benchmark itself is too big for the suite; docs/benchmarks.md has
its output): the synthetic models have the real models' parameter counts, and the writer's
checkpoint converts."""

from __future__ import annotations

import math

import jax
import numpy as np

from soljax.lm.convert import convert
from soljax.lm.checkpoint import load_model
from soljax.tools.bench_convert import hf_tensor_shapes, peak_rss_bytes, write_synthetic_llama
from soljax.tools.shapes import SHAPES, hf_config, shape_config


def test_synthetic_shapes_have_the_real_parameter_counts():
    counts = {name: sum(math.prod(s) for s in hf_tensor_shapes(hf_config(name)).values()) for name in SHAPES}
    assert counts == {"llama-tiny": 361_088, "smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400,
                      "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}
    cfg = shape_config("llama-3.1-8b", "bfloat16")
    assert (cfg.rope_scaling.rope_type, cfg.max_position_embeddings, cfg.dtype) == ("llama3", 131072, "bfloat16")
    assert shape_config("smollm2-135m").rope_theta == 100000.0


def test_synthetic_checkpoint_is_sharded_and_converts(tmp_path):
    info = write_synthetic_llama(tmp_path / "hf", "llama-tiny", shard_bytes=4 * 512 * 128)
    assert info["shards"] > 2 and info["largest_tensor"] == "model.embed_tokens.weight"
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) == info["shards"]
    cfg = convert(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", quiet=True)
    got_cfg, params, _ = load_model(tmp_path / "out")
    assert got_cfg == cfg and cfg.dtype == "bfloat16" and cfg.num_layers == 2
    assert sum(x.size for x in jax.tree.leaves(params)) == info["parameters"]
    assert np.all(np.asarray(params["final_norm"], np.float32) == 1.0)
    assert peak_rss_bytes() > 10**7  # this process's high-water mark, in bytes
