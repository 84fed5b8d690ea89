"""CLI behaviour: conversion, info, ppl, generate, and one-line errors for bad input."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from soljax import cli
from soljax.lm import LMConfig, init_params
from soljax.lm.keymap import params_to_hf

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "and", "then"]


def _write_hf_dir(path, model_type="llama", **overrides):
    cfg = LMConfig(vocab_size=len(WORDS) + 1, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0), scale=0.3))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in params_to_hf(cfg, params).items()},
              str(path / "model.safetensors"))
    hf = {"model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": True, "max_position_embeddings": 128}
    hf.update(overrides)
    (path / "config.json").write_text(json.dumps(hf))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    hf = _write_hf_dir(root / "hf")
    assert cli.main(["convert", "--from", str(hf), "--out", str(root / "model")]) == 0
    return root


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("soljax: error")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_info_reports_config_and_parameter_count(tiny_model, capsys):
    rc, out, _ = _run(capsys, "info", str(tiny_model / "model"))
    assert rc == 0
    info = json.loads(out)
    assert info["config"]["num_layers"] == 2
    # embed 13x32 + final norm + 2 layers x (2 norms + q 32x32 + k,v 32x16 + o 32x32 + 3 mlp 32x48)
    per_layer = 2 * 32 + 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48
    assert info["parameters"] == 13 * 32 + 32 + 2 * per_layer


def test_ppl_prints_json_per_file(tiny_model, tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text(" ".join(WORDS * 5))
    rc, out, _ = _run(capsys, "ppl", "--quiet", "--model", str(tiny_model / "model"), "--window", "16",
                      str(text))
    assert rc == 0
    (entry,) = json.loads(out)["files"]
    # 60 tokens in windows of 16: 16, 16, 16, 12 -> 15 + 15 + 15 + 11 scored tokens
    assert entry["tokens"] == 56
    assert entry["ppl"] == pytest.approx(np.exp(entry["mean_nll"]))


def test_generate_prints_prompt_and_continuation(tiny_model, capsys):
    rc, out, err = _run(capsys, "generate", "--model", str(tiny_model / "model"), "--prompt", "the cat",
                        "--max-new-tokens", "5")
    assert rc == 0
    assert out.startswith("the cat")
    assert "5 new tokens" in err


def test_missing_inputs_give_one_line(tmp_path, capsys):
    _assert_one_line_error(*_run(capsys, "convert", "--from", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "o"))[::2], "no such file")
    _assert_one_line_error(*_run(capsys, "info", str(tmp_path))[::2], "not a soljax model directory")
    _assert_one_line_error(*_run(capsys, "ppl", "--model", str(tmp_path), "x.txt")[::2], "model.json")


def test_ppl_missing_text_file(tiny_model, tmp_path, capsys):
    _assert_one_line_error(*_run(capsys, "ppl", "--model", str(tiny_model / "model"),
                                 str(tmp_path / "missing.txt"))[::2], "no such file")


def test_truncated_safetensors(tmp_path, capsys):
    hf = _write_hf_dir(tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_one_line_error(*_run(capsys, "convert", "--from", str(hf), "--out", str(tmp_path / "o"))[::2],
                           "truncated")


def test_garbage_safetensors(tmp_path, capsys):
    hf = _write_hf_dir(tmp_path / "hf")
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _assert_one_line_error(*_run(capsys, "convert", "--from", str(hf), "--out", str(tmp_path / "o"))[::2],
                           "corrupt")


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4000))
    _assert_one_line_error(*_run(capsys, "convert", "--from", str(bad), "--out", str(tmp_path / "o"))[::2],
                           "GGUF")


def test_unsupported_architecture(tmp_path, capsys):
    hf = _write_hf_dir(tmp_path / "hf", model_type="gpt2")
    _assert_one_line_error(*_run(capsys, "convert", "--from", str(hf), "--out", str(tmp_path / "o"))[::2],
                           "unsupported architecture", "gpt2")


@pytest.mark.parametrize("overrides, needle", [
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"num_hidden_layers": 0}, "num_layers"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling"),
])
def test_bad_config_values(tmp_path, capsys, overrides, needle):
    hf = _write_hf_dir(tmp_path / "hf", **overrides)
    _assert_one_line_error(*_run(capsys, "convert", "--from", str(hf), "--out", str(tmp_path / "o"))[::2],
                           needle)


def test_shape_mismatch_in_checkpoint(tmp_path, capsys):
    hf = _write_hf_dir(tmp_path / "hf", hidden_size=64)
    _assert_one_line_error(*_run(capsys, "convert", "--from", str(hf), "--out", str(tmp_path / "o"))[::2],
                           "expected")


def test_corrupt_orbax_checkpoint(tiny_model, tmp_path, capsys):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model / "model", broken)
    for f in (broken / "params").rglob("*"):  # the arrays' stores, whatever orbax layout holds them
        if f.is_file() and ("manifest" in f.name or f.parent != broken / "params"):
            f.write_bytes(b"garbage")
    assert _run(capsys, "info", str(broken))[0] == 0  # the config is still readable
    rc, _, err = _run(capsys, "generate", "--model", str(broken), "--prompt", "the")
    _assert_one_line_error(rc, err, "cannot restore parameters")


def test_debug_flag_shows_traceback(tmp_path):
    with pytest.raises(Exception):
        cli.main(["--debug", "info", str(tmp_path)])


def _spec(**overrides):
    spec = {"blocks": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]],
            "page_size": 2, "Ts": 1, "Tw": 1,
            "schedules": [{"name": "dense", "kappa": [1, 1, 1], "rho": [1, 1, 1], "bits": [16, 16, 16]},
                          {"name": "tight", "kappa": [0.3, 0.5, 0.3], "rho": [0.5, 1, 0.5], "bits": [4, 16, 4]}]}
    spec.update(overrides)
    return spec


def test_score_schedules_output_shape_and_dense_matches_ppl(tiny_model, tmp_path, capsys):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(_spec()))
    rc, out, _ = _run(capsys, "score-schedules", "--model", str(tiny_model / "model"), str(path))
    assert rc == 0
    results = json.loads(out)["results"]
    assert [(r["block"], r["schedule"]) for r in results] == [(0, "dense"), (0, "tight"), (1, "dense"), (1, "tight")]
    for r in results:
        assert len(r["logprobs"]) == len(r["attended_fraction"]) == 3
        assert r["mean_logprob"] == pytest.approx(np.mean(r["logprobs"]))
    assert results[0]["attended_fraction"] == [1.0, 1.0, 1.0]
    assert results[1]["usage"]["quant"] == pytest.approx((4 + 16 + 4) / 3 / 16)
    assert results[1]["logprobs"] != results[0]["logprobs"]


@pytest.mark.parametrize("overrides, needle", [
    ({"schedules": [{"name": "x", "kappa": [0, 1, 1], "rho": [1, 1, 1], "bits": [16, 16, 16]}]}, "kappa"),
    ({"schedules": [{"name": "x", "kappa": [1, 1], "rho": [1, 1, 1], "bits": [16, 16, 16]}]}, "same length"),
    ({"schedules": [{"name": "x", "kappa": [1, 1, 1], "rho": [1, 1, 1], "bits": [1, 16, 16]}]}, "bits"),
    ({"blocks": [[1, 2, 3]]}, "at least"),
    ({"blocks": [[1, 2, 3, 4, 500, 6]]}, "outside"),
    ({"criterion": "lottery"}, "criterion"),
])
def test_score_schedules_bad_input(tiny_model, tmp_path, capsys, overrides, needle):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(_spec(**overrides)))
    rc, _, err = _run(capsys, "score-schedules", "--model", str(tiny_model / "model"), str(path))
    _assert_one_line_error(rc, err, needle)
