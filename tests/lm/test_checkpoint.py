"""Orbax checkpoints of LM parameters and torch-free conversion of Hugging Face directories.

HF directories are written by hand here (``config.json``, safetensors from ``params_to_hf``,
``tokenizer.json``), so converting them needs neither torch nor transformers.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from soljax import lm
from soljax.lm.convert import convert, read_hf
from soljax.errors import SoljaxError
from soljax.lm.checkpoint import load_config, load_model, restore_params, save_params
from soljax.lm.config import LMConfig
from soljax.lm.keymap import params_to_hf
from soljax.lm.params import abstract_params



def tiny_cfg(**changes) -> LMConfig:
    base = dict(arch="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8)
    return LMConfig(**{**base, **changes})


# Every optional leaf at once (biases, qk-norm, untied head), and a tied llama.
FULL_CFG = tiny_cfg(qkv_bias=True, o_bias=True, qk_norm=True, tie_word_embeddings=False)
TIED_CFG = tiny_cfg(tie_word_embeddings=True, num_kv_heads=1)


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_bitwise_equal(a, b):
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        x, y = np.asarray(la[k]), np.asarray(lb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


# ----------------------------------------------------------------------------- orbax round trips


@pytest.mark.parametrize("cfg", [FULL_CFG, TIED_CFG, FULL_CFG.replace(dtype="bfloat16")],
                         ids=["full-f32", "tied-f32", "full-bf16"])
def test_save_restore_is_bitwise_exact(tmp_path, cfg):
    params = lm.init_params(cfg, jax.random.key(0), scale=0.2)
    save_params(tmp_path / "params", params)
    target = abstract_params(cfg)
    restored = restore_params(tmp_path / "params", target)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(target)
    for x, t in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target)):
        assert x.shape == t.shape and x.dtype == t.dtype == jnp.dtype(cfg.dtype)
    assert_bitwise_equal(restored, params)


def test_restore_onto_an_explicit_sharding(tmp_path):
    cfg = FULL_CFG
    params = lm.init_params(cfg, jax.random.key(1))
    save_params(tmp_path / "params", params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = restore_params(tmp_path / "params", abstract_params(cfg, sharding))
    assert all(x.sharding == sharding for x in jax.tree_util.tree_leaves(restored))
    per_leaf = abstract_params(cfg, lambda path, shape: sharding)
    assert_bitwise_equal(restore_params(tmp_path / "params", per_leaf), params)


def test_save_overwrites(tmp_path):
    cfg = TIED_CFG
    save_params(tmp_path / "params", lm.init_params(cfg, jax.random.key(0)))
    second = lm.init_params(cfg, jax.random.key(1))
    save_params(tmp_path / "params", second)
    assert_bitwise_equal(restore_params(tmp_path / "params", abstract_params(cfg)), second)


def test_restore_errors(tmp_path):
    with pytest.raises(SoljaxError, match="not found"):
        restore_params(tmp_path / "nothing", abstract_params(TIED_CFG))
    with pytest.raises(SoljaxError, match="not a soljax model directory"):
        load_model(tmp_path)
    save_params(tmp_path / "params", lm.init_params(TIED_CFG, jax.random.key(0)))
    for other in (TIED_CFG.replace(tie_word_embeddings=False), TIED_CFG.replace(qkv_bias=True),
                  TIED_CFG.replace(num_layers=TIED_CFG.num_layers + 1)):
        with pytest.raises(SoljaxError, match="does not match the model"):
            restore_params(tmp_path / "params", abstract_params(other))


# ----------------------------------------------------------------------------- HF dirs without torch


def hf_config_dict(cfg: LMConfig) -> dict:
    """A Hugging Face ``config.json`` for ``cfg`` (llama/qwen2/qwen3 model types)."""
    d = {
        "model_type": cfg.arch, "architectures": ["X"], "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if cfg.arch in ("llama", "qwen3"):
        d["attention_bias"] = cfg.o_bias or cfg.qkv_bias
    return d


def write_hf_dir(path, cfg, params, tokenizer_json, *, dtype=np.float32, shards=1, config=None):
    """Writes ``params`` as an HF directory: config.json, (sharded) safetensors, tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v).astype(dtype) for k, v in params_to_hf(cfg, params).items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i::shards]}
            save_file(part, str(path / fname))
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or hf_config_dict(cfg)))
    (path / "tokenizer.json").write_text(tokenizer_json(cfg.vocab_size))
    return path


HF_CFGS = {
    "llama-untied-obias": tiny_cfg(o_bias=True, qkv_bias=True, rms_norm_eps=1e-6),
    "llama-tied-mqa": TIED_CFG.replace(rope_theta=500000.0),
    "qwen2-tied": tiny_cfg(arch="qwen2", qkv_bias=True, tie_word_embeddings=True),
    "qwen3-untied": tiny_cfg(arch="qwen3", qk_norm=True, head_dim=16),
}


@pytest.mark.parametrize("name", list(HF_CFGS))
def test_convert_handwritten_hf_dir_is_exact(tmp_path, word_tokenizer_json, name):
    cfg = HF_CFGS[name]
    assert LMConfig.from_hf(hf_config_dict(cfg)) == cfg.replace(bos_token_id=1, eos_token_ids=(2,))
    params = lm.init_params(cfg, jax.random.key(3), scale=0.2)
    src = write_hf_dir(tmp_path / "hf", cfg, params, word_tokenizer_json, shards=2)
    returned = convert(src, tmp_path / "out", quiet=True)
    got_cfg, got_params, tok = load_model(tmp_path / "out")
    assert got_cfg == returned == cfg.replace(bos_token_id=1, eos_token_ids=(2,))
    assert load_config(tmp_path / "out") == got_cfg
    assert_bitwise_equal(got_params, params)
    assert tok.vocab_size == cfg.vocab_size and tok.encode("w5 w6") == [5, 6]
    assert tok.fingerprint == type(tok)(word_tokenizer_json(cfg.vocab_size)).fingerprint
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["format"] == "soljax-lm" and LMConfig.from_dict(meta["config"]) == got_cfg
    # The converted model computes exactly what the original parameters compute.
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    a = lm.logits(cfg, params, lm.forward(cfg, params, tokens))
    b = lm.logits(got_cfg, got_params, lm.forward(got_cfg, got_params, tokens))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_convert_to_bfloat16_round_trip(tmp_path, word_tokenizer_json):
    cfg = tiny_cfg(arch="qwen3", qk_norm=True, qkv_bias=True, bos_token_id=1, eos_token_ids=(2,))
    assert LMConfig.from_hf(hf_config_dict(cfg)) == cfg
    params = lm.init_params(cfg, jax.random.key(4), scale=0.2)
    src = write_hf_dir(tmp_path / "hf", cfg, params, word_tokenizer_json)

    out = tmp_path / "bf16"
    convert(src, out, dtype="bfloat16", quiet=True)
    got_cfg, got, _ = load_model(out)
    assert got_cfg.dtype == "bfloat16"
    expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    assert_bitwise_equal(got, expected)
    # bf16 -> save -> restore is exact
    save_params(tmp_path / "again", got)
    assert_bitwise_equal(restore_params(tmp_path / "again", abstract_params(got_cfg)), expected)
    # widening on load gives exactly the bf16 values in float32
    f32_cfg, f32, _ = load_model(out, dtype="float32")
    assert f32_cfg.dtype == "float32"
    assert_bitwise_equal(f32, jax.tree.map(lambda x: x.astype(np.float32), expected))
    # and a float32 directory narrowed on load equals the bf16 conversion
    convert(src, tmp_path / "f32", quiet=True)
    narrowed_cfg, narrowed, _ = load_model(tmp_path / "f32", dtype="bfloat16")
    assert narrowed_cfg == got_cfg
    assert_bitwise_equal(narrowed, expected)
    # the bf16 model runs and stays close to float32
    tokens = jnp.asarray([[1, 5, 9, 30, 2, 7]], jnp.int32)
    lo = lm.logits(got_cfg, got, lm.forward(got_cfg, got, tokens))
    hi = lm.logits(cfg, params, lm.forward(cfg, params, tokens))
    assert lo.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(lo - hi))) < 0.1 * float(jnp.max(jnp.abs(hi)))


def test_bfloat16_safetensors_convert_to_float32(tmp_path, word_tokenizer_json):
    cfg = HF_CFGS["qwen2-tied"]
    params = lm.init_params(cfg, jax.random.key(5), scale=0.2)
    src = write_hf_dir(tmp_path / "hf", cfg, params, word_tokenizer_json, dtype=ml_dtypes.bfloat16)
    convert(src, tmp_path / "out", quiet=True)
    _, got, _ = load_model(tmp_path / "out")
    expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                            params)
    assert_bitwise_equal(got, expected)


def test_untied_config_without_lm_head_is_read_as_tied(tmp_path, word_tokenizer_json):
    cfg = TIED_CFG
    params = lm.init_params(cfg, jax.random.key(6))
    hf = {**hf_config_dict(cfg), "tie_word_embeddings": False}
    src = write_hf_dir(tmp_path / "hf", cfg, params, word_tokenizer_json, config=hf)
    got_cfg, np_params, _ = read_hf(src)
    assert got_cfg.tie_word_embeddings and "lm_head" not in np_params


def test_convert_rejects_incomplete_dirs(tmp_path, word_tokenizer_json):
    cfg = HF_CFGS["llama-untied-obias"]
    params = lm.init_params(cfg, jax.random.key(7))
    src = write_hf_dir(tmp_path / "hf", cfg, params, word_tokenizer_json)
    (src / "tokenizer.json").unlink()
    with pytest.raises(SoljaxError, match="tokenizer.json"):
        convert(src, tmp_path / "out", quiet=True)
    with pytest.raises(SoljaxError, match="config.json"):
        convert(tmp_path, tmp_path / "out", quiet=True)
    # a missing layer tensor is reported, not silently left uninitialised
    tensors = params_to_hf(cfg, params)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(src / "model.safetensors"))
    (src / "tokenizer.json").write_text(word_tokenizer_json(cfg.vocab_size))
    with pytest.raises(SoljaxError, match="missing tensors.*w_up"):
        convert(src, tmp_path / "out2", quiet=True)
