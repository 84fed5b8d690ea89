"""Bad input through the CLI: one ``soljax: error:`` line on stderr, a non-zero exit, no traceback,
and existing run or model directories left as they were."""

import json
import shutil
import struct

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import write_policy_run
from soljax import cli
from soljax.config import TrainConfig
from soljax.errors import SoljaxError
from soljax.lm import LMConfig, init_params
from soljax.lm.keymap import params_to_hf

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "and", "then"]
MAX_POS = 64  # the tiny model's max_position_embeddings


def _tiny_cfg() -> LMConfig:
    return LMConfig(vocab_size=len(WORDS) + 1, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=MAX_POS)


def _write_hf_dir(path, tensors: bool = True):
    """A tiny Llama HF directory (config.json, tokenizer.json and, with ``tensors``, model.safetensors)."""
    cfg = _tiny_cfg()
    path.mkdir(parents=True, exist_ok=True)
    if tensors:
        params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0), scale=0.3))
        save_file({k: np.ascontiguousarray(v) for k, v in params_to_hf(cfg, params).items()},
                  str(path / "model.safetensors"))
    hf = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
          "max_position_embeddings": MAX_POS}
    (path / "config.json").write_text(json.dumps(hf))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``{"hf": HF dir, "model": converted soljax model dir}`` of the tiny model."""
    root = tmp_path_factory.mktemp("tiny")
    hf = _write_hf_dir(root / "hf")
    assert cli.main(["convert", "--from", str(hf), "--out", str(root / "model")]) == 0
    return {"hf": hf, "model": root / "model"}


def _run(capsys, *argv):
    capsys.readouterr()  # drop output of earlier steps
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(result, *needles):
    rc, _, err = result
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("soljax: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _snapshot(directory):
    """Every file under ``directory`` with its bytes (to check that a directory was left alone)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    """An existing directory standing in for a run, with its snapshot."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("lr: 0.001\n")
    (run / "metrics.jsonl").write_text('{"batch": 1}\n')
    return run, _snapshot(run)


# ----------------------------------------------------------------------------- 1. training config


def test_train_override_that_is_not_yaml(run_dir, capsys):
    run, before = run_dir
    _assert_one_line_error(_run(capsys, "train", "--out", run, "lr=["), "override 'lr=['", "not valid YAML")
    assert _snapshot(run) == before


def test_train_config_file_that_is_not_utf8(run_dir, tmp_path, capsys):
    run, before = run_dir
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe lr: 1")
    _assert_one_line_error(_run(capsys, "train", "--config", bad, "--out", run), str(bad), "not UTF-8")
    assert _snapshot(run) == before


def test_train_config_file_that_is_not_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    _assert_one_line_error(_run(capsys, "train", "--config", bad), str(bad), "not valid YAML", "line 2")


# ----------------------------------------------------------------------------- 2. safetensors headers


def _write_safetensors(path, header, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _convert_into_copy(tiny, tmp_path, capsys, src):
    """Converts ``src`` into a copy of the tiny model; returns the result and whether the copy is intact."""
    out = tmp_path / "existing"
    shutil.copytree(tiny["model"], out)
    before = _snapshot(out)
    result = _run(capsys, "convert", "--from", src, "--out", out)
    return result, _snapshot(out) == before


def test_safetensors_header_that_is_not_an_object(tiny, tmp_path, capsys):
    hf = _write_hf_dir(tmp_path / "hf", tensors=False)
    _write_safetensors(hf / "model.safetensors", [{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}],
                       bytes(8))
    result, intact = _convert_into_copy(tiny, tmp_path, capsys, hf)
    _assert_one_line_error(result, "model.safetensors", "not an object")
    assert intact


@pytest.mark.parametrize("offsets, needle", [
    ({"a": [0, 8], "b": [4, 12]}, "'a' and 'b' overlap"),
    ({"a": [0, 8], "b": [0, 8]}, "overlap"),
    ({"a": [-8, 0], "b": [8, 16]}, "data_offsets [-8, 0]"),
    ({"a": [8, 0], "b": [8, 16]}, "data_offsets [8, 0]"),
    ({"a": [0, 8], "b": [16, 24]}, "ends past the end"),
    ({"a": [0, 8], "b": [8, 16.0]}, "bad entry for tensor 'b'"),
])
def test_safetensors_bad_data_offsets(tiny, tmp_path, capsys, offsets, needle):
    hf = _write_hf_dir(tmp_path / "hf", tensors=False)
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": o} for name, o in offsets.items()}
    _write_safetensors(hf / "model.safetensors", header, bytes(16))
    result, intact = _convert_into_copy(tiny, tmp_path, capsys, hf)
    _assert_one_line_error(result, "model.safetensors", needle)
    assert intact


def test_safetensors_negative_shape(tmp_path, capsys):
    hf = _write_hf_dir(tmp_path / "hf", tensors=False)
    _write_safetensors(hf / "model.safetensors", {"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}},
                       bytes(8))
    _assert_one_line_error(_run(capsys, "convert", "--from", hf, "--out", tmp_path / "o"), "bad entry for tensor 'a'")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 3. model.json


@pytest.mark.parametrize("meta, needle", [
    ({"format": "soljax-lm", "version": 1, "source": "x"}, "no 'config' object"),
    ({"format": "soljax-lm", "version": 1, "config": [1, 2]}, "no 'config' object"),
    ([{"format": "soljax-lm"}], "not a soljax model description"),
    ({"format": "soljax-lm", "version": 1, "config": {"rope_scaling": {"kind": "x"}}}, "model config"),
])
def test_model_json_without_a_config(tiny, tmp_path, capsys, meta, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    (model / "model.json").write_text(json.dumps(meta))
    before = _snapshot(model)
    _assert_one_line_error(_run(capsys, "info", model), "model.json", needle)
    _assert_one_line_error(_run(capsys, "generate", "--model", model, "--prompt", "the"), needle)
    assert _snapshot(model) == before


# ----------------------------------------------------------------------------- 4. GGUF metadata


def _write_gguf(path, *, rope_scaling: str | None = None, vocab: bool = True, tokens: bool = True):
    """A GGUF file with a tiny Llama's metadata (and no tensors: the config is refused first)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(MAX_POS)
    if rope_scaling is not None:
        w.add_string("llama.rope.scaling.type", rope_scaling)
        w.add_float32("llama.rope.scaling.factor", 4.0)
    if vocab:
        w.add_uint32("llama.vocab_size", len(WORDS) + 1)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["[UNK]"] + WORDS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_gguf_unsupported_rope_scaling(tmp_path, capsys, kind):
    src = _write_gguf(tmp_path / "m.gguf", rope_scaling=kind)
    _assert_one_line_error(_run(capsys, "convert", "--from", src, "--out", tmp_path / "o"),
                           f"rope scaling type {kind!r}", "llama.rope.scaling.type")
    assert not (tmp_path / "o").exists()


def test_gguf_without_vocab_size_or_tokens(tmp_path, capsys):
    src = _write_gguf(tmp_path / "m.gguf", vocab=False, tokens=False)
    _assert_one_line_error(_run(capsys, "convert", "--from", src, "--out", tmp_path / "o"),
                           "llama.vocab_size", "tokenizer.ggml.tokens")
    assert not (tmp_path / "o").exists()


def test_gguf_vocab_from_tokens_and_plain_rope_still_read(tmp_path):
    from soljax.lm.gguf_io import config_from_gguf, open_gguf

    for rope in (None, "none", "linear"):
        src = _write_gguf(tmp_path / f"m_{rope}.gguf", rope_scaling=rope, vocab=False)
        cfg = config_from_gguf(open_gguf(src))
        assert cfg.vocab_size == len(WORDS) + 1 and cfg.max_position_embeddings == MAX_POS
        assert cfg.rope_scaling.rope_type == ("linear" if rope == "linear" else "default")


# ----------------------------------------------------------------------------- 5. positions past the context


def test_ppl_window_beyond_the_context(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 10))
    _assert_one_line_error(_run(capsys, "ppl", "--model", tiny["model"], "--window", MAX_POS + 1, text),
                           "--window", f"{MAX_POS + 1} tokens", f"max_position_embeddings = {MAX_POS}")
    rc, out, _ = _run(capsys, "ppl", "--quiet", "--model", tiny["model"], "--window", MAX_POS, text)
    assert rc == 0
    at_max = json.loads(out)["files"][0]
    rc, out, _ = _run(capsys, "ppl", "--quiet", "--model", tiny["model"], text)  # default: the model's maximum
    assert rc == 0 and json.loads(out)["files"][0] == at_max


def _spec(block_len: int, **schedule):
    sched = {"name": "s", "kappa": [1, 0.5], "rho": [1, 1], "bits": [16, 8], **schedule}
    return {"blocks": [[1 + i % len(WORDS) for i in range(block_len)]], "page_size": 2, "Ts": 1, "Tw": 1,
            "schedules": [sched]}


def test_score_schedules_block_beyond_the_context(tiny, tmp_path, capsys):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(_spec(MAX_POS + 1)))
    _assert_one_line_error(_run(capsys, "score-schedules", "--model", tiny["model"], path),
                           "block 0", f"max_position_embeddings = {MAX_POS}")


def test_train_blocks_beyond_the_context(tiny, run_dir, capsys):
    run, before = run_dir
    _assert_one_line_error(_run(capsys, "train", "--out", run, f"model={tiny['model']}", "context_len=60",
                                "rollout_len=4", "policy_max_len=8", "batch_size=2"),
                           "context_len + rollout_len + 1", f"{60 + 4 + 1} tokens", str(MAX_POS))
    assert _snapshot(run) == before


def test_eval_blocks_beyond_the_context(tiny, tmp_path, capsys):
    from soljax.control.network import init_policy
    from soljax.config import action_grid, policy_config

    cfg = TrainConfig.load(None, [f"model={tiny['model']}", "context_len=60", "rollout_len=4", "policy_max_len=8",
                                  "policy_d_model=16", "policy_n_heads=2"])
    run = tmp_path / "run"
    write_policy_run(run, cfg, init_policy(policy_config(cfg), action_grid(cfg).num_actions, 32, 32,
                                           jax.random.PRNGKey(0)))
    before = _snapshot(run)
    _assert_one_line_error(_run(capsys, "eval", "ppl", "--run", run, "--quiet", "--methods", "dense"),
                           "context_len + rollout_len + 1", f"max_position_embeddings = {MAX_POS}")
    assert _snapshot(run) == before


def test_sweep_checks_the_block_length_against_the_lm():
    from soljax.eval.sweep import Sweep, SweepConfig

    cfg = _tiny_cfg()
    train_cfg = TrainConfig.load(None, ["context_len=60", "rollout_len=4", "policy_max_len=8"])
    with pytest.raises(SoljaxError, match="max_position_embeddings"):
        Sweep((cfg, None, None), train_cfg, {}, SweepConfig(methods=("dense",)))


# ----------------------------------------------------------------------------- 6. schedule controls


@pytest.mark.parametrize("schedule, needle", [
    ({"kappa": [[0.5], [1]]}, "'kappa'"),
    ({"kappa": [[0.5]], "rho": [1], "bits": [16]}, "'kappa'"),
    ({"kappa": ["a", 1]}, "'kappa'"),
    ({"rho": ["1", 1]}, "'rho'"),
    ({"bits": [True, 16]}, "'bits'"),
    ({"kappa": [True, 1]}, "'kappa'"),
    ({"bits": [None, 16]}, "'bits'"),
])
def test_score_schedules_controls_that_are_not_flat_numbers(tiny, tmp_path, capsys, schedule, needle):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(_spec(8, **schedule)))
    _assert_one_line_error(_run(capsys, "score-schedules", "--model", tiny["model"], path),
                           "schedule 's'", needle, "flat list of numbers")


# ----------------------------------------------------------------------------- 7. convert --out


def test_convert_refuses_a_non_empty_directory_that_is_not_a_model(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "model.json").write_text("{}")
    (out / "model.json").write_text(json.dumps({"format": "something else"}))
    before = _snapshot(out)
    _assert_one_line_error(_run(capsys, "convert", "--from", tiny["hf"], "--out", out), str(out), "--force")
    assert _snapshot(out) == before
    rc, _, _ = _run(capsys, "convert", "--from", tiny["hf"], "--out", out, "--force")
    assert rc == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "model.json").read_text())["format"] == "soljax-lm"


def test_convert_refuses_an_output_path_that_is_a_file(tiny, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("keep me")
    for force in ((), ("--force",)):
        _assert_one_line_error(_run(capsys, "convert", "--from", tiny["hf"], "--out", out, *force),
                               "not a directory")
        assert out.read_text() == "keep me"


def test_convert_overwrites_a_model_and_fills_an_empty_directory(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    (model / "model.json").write_text((model / "model.json").read_text().replace('"source": "hf"',
                                                                                 '"source": "old"'))
    assert json.loads((model / "model.json").read_text())["source"] == "old"
    rc, _, _ = _run(capsys, "convert", "--from", tiny["hf"], "--out", model)
    assert rc == 0 and json.loads((model / "model.json").read_text())["source"] == "hf"
    (tmp_path / "empty").mkdir()
    assert _run(capsys, "convert", "--from", tiny["hf"], "--out", tmp_path / "empty")[0] == 0
    assert (tmp_path / "empty" / "model.json").is_file()


def test_extend_with_an_unknown_attention_impl():
    from soljax.lm import model as lm

    cfg = LMConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=4)
    cache = lm.KVCache.empty(cfg, 1, 8)
    with pytest.raises(SoljaxError, match="attention_impl"):
        lm.extend(cfg, init_params(cfg, jax.random.PRNGKey(0)), cache, np.zeros((1, 2), np.int32),
                  attention_impl="triton")
