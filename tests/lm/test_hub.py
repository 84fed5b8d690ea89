"""Model ids: a Hugging Face cache built here (a tiny random Llama and Qwen2 saved with
``transformers`` in the ``models--org--name/snapshots/<commit>/`` layout, refs/main), offline.

``soljax convert --from org/name`` and ``soljax train ... model=org/name`` work from it and the
converted models match ``transformers``; the conversion is made once and reused; an interrupted
one is never reused; a model neither local nor cached is one line naming the download; a download
(faked: no network here) fetches only what conversion reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_hf, require_torch

require_torch()

from soljax import cli  # noqa: E402
from soljax.errors import SoljaxError  # noqa: E402
from soljax.lm import hub  # noqa: E402
from soljax.lm.checkpoint import load_model  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")]

REPOS = {"llama": "tiny-org/tiny-llama", "qwen2": "tiny-org/tiny-qwen2"}
TOL = 1e-4


def _commit(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def cache_repo(root: Path, repo_id: str, src: Path, commit: str, *, symlinks: bool) -> Path:
    """Puts the files of ``src`` into the Hugging Face cache ``root`` as ``repo_id`` at ``commit``
    (refs/main), as blobs linked from the snapshot when ``symlinks`` (the hub's own layout)."""
    repo = hub.repo_cache_dir(repo_id, root)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if symlinks:
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        else:
            shutil.copyfile(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """``{"root": cache root, "soljax": soljax cache, "models": {arch: TinyHF}, "commits": {arch: sha}}``."""
    base = tmp_path_factory.mktemp("hub")
    root, models, commits = base / "hf", {}, {}
    for i, (arch, repo_id) in enumerate(REPOS.items()):
        models[arch] = build_tiny_hf(base / f"src_{arch}", arch, seed=i)
        commits[arch] = _commit(repo_id)
        cache_repo(root, repo_id, models[arch].path, commits[arch], symlinks=arch == "llama")
    return {"root": root, "soljax": base / "soljax", "models": models, "commits": commits, "base": base}


@pytest.fixture(autouse=True)
def offline_env(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache["root"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SOLJAX_CACHE_DIR", str(hf_cache["soljax"]))


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("soljax: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _assert_matches_transformers(model_dir: Path, tiny) -> None:
    import jax.numpy as jnp

    from soljax import lm

    cfg, params, _ = load_model(model_dir)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    ours = np.asarray(lm.logits(cfg, params, lm.forward(cfg, params, jnp.asarray(ids))))
    ref = tiny.logits(ids)
    assert ours.shape == ref.shape
    assert float(np.max(np.abs(ours - ref))) < TOL


@pytest.mark.parametrize("arch", list(REPOS))
def test_convert_from_a_cached_id_matches_transformers(hf_cache, tmp_path, capsys, arch):
    repo_id, commit = REPOS[arch], hf_cache["commits"][arch]
    rc, out, err = _run(capsys, "convert", "--from", repo_id, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "converted" in out
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["source"] == f"{repo_id}@{commit}"
    _assert_matches_transformers(tmp_path / "out", hf_cache["models"][arch])
    # the existing output checks still apply to ids
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _one_line_error(*_run(capsys, "convert", "--from", repo_id, "--out", tmp_path / "other")[::2],
                    "not a soljax model", "--force")


def test_train_names_a_cached_id_and_its_conversion_is_reused(hf_cache, tmp_path, capsys, monkeypatch):
    from soljax import runs
    from soljax.runs import checkpoint_steps, run_config

    repo_id, commit = REPOS["qwen2"], hf_cache["commits"]["qwen2"]
    vocab = hf_cache["models"]["qwen2"].hf_config["vocab_size"]
    words = np.random.default_rng(1).integers(1, vocab, 4000)
    (tmp_path / "data.txt").write_text(" ".join(f"w{i}" for i in words))
    config = tmp_path / "tiny.yaml"
    config.write_text("\n".join([
        f"data: {tmp_path / 'data.txt'}", "context_len: 16", "rollout_len: 4", "batch_size: 2",
        "grpo_rollouts_per_input: 4", "policy_d_model: 32", "policy_n_heads: 2", "policy_max_len: 8",
        "ppo_target_batch_size: 32", "ppo_minibatch_size: 16", "grad_accum_steps: 1", "quest_page_size: 4",
        "Ts: 1", "Tw: 1", "checkpoint_every: 1", "max_batches: 1", "model: embedded"]) + "\n")
    rc, _, err = _run(capsys, "train", "--config", config, "--out", tmp_path / "run", "--quiet", f"model={repo_id}")
    assert rc == 0, err
    assert run_config(tmp_path / "run").model == repo_id
    assert checkpoint_steps(tmp_path / "run") == [1]
    converted = hf_cache["soljax"] / "models" / "hf" / repo_id.replace("/", "--") / f"{commit}-float32"
    assert (converted / "model.json").is_file()
    assert f"converting {repo_id}@{commit}" in err
    _assert_matches_transformers(converted, hf_cache["models"]["qwen2"])
    # a second resolution reuses the conversion: converting again would fail here
    stamp = (converted / "model.json").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("soljax.lm.convert.convert", no_conversion)
    assert runs.model_directory(repo_id, "float32") == converted
    assert runs.model_directory(f"{repo_id}@main", "float32") == converted
    assert runs.model_directory(f"{repo_id}@{commit}", "float32") == converted
    assert (converted / "model.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name, converted.name + ".lock"]


def test_not_cached_and_offline_is_one_line(hf_cache, tmp_path, capsys):
    root = hf_cache["root"]
    line = _one_line_error(*_run(capsys, "convert", "--from", "meta-llama/Llama-3.2-1B", "--out",
                                 tmp_path / "o")[::2],
                           "meta-llama/Llama-3.2-1B", "HF_HUB_OFFLINE", "hf download meta-llama/Llama-3.2-1B",
                           "models--meta-llama--Llama-3.2-1B", str(root))
    assert not (tmp_path / "o").exists(), line
    _one_line_error(*_run(capsys, "ppl", "--model", "meta-llama/Llama-3.2-1B@v2", tmp_path / "x.txt")[::2],
                    "--revision v2", str(root))
    _one_line_error(*_run(capsys, "train", "--out", tmp_path / "run", "model=meta-llama/Llama-3.2-1B")[::2],
                    "hf download meta-llama/Llama-3.2-1B")
    # a branch the cache does not know, and a path that does not exist, are refused the same way
    _one_line_error(*_run(capsys, "info", f"{REPOS['llama']}@no-such-branch")[::2], "HF_HUB_OFFLINE")
    _one_line_error(*_run(capsys, "info", tmp_path / "missing" / "model")[::2], "model not found")


def test_cache_lookup_and_ids():
    root = Path(os.environ["HF_HUB_CACHE"])
    llama = hub.cached_snapshot(REPOS["llama"], None, root)
    assert llama is not None and llama.parent.name == "snapshots" and (llama / "config.json").is_file()
    assert hub.cached_snapshot(REPOS["llama"], "main", root) == llama
    assert hub.cached_snapshot(REPOS["llama"], llama.name, root) == llama
    assert hub.cached_snapshot(REPOS["llama"], "v1", root) is None
    assert hub.cached_snapshot("tiny-org/absent", None, root) is None
    assert hub.parse_model_id("org/name") == ("org/name", None)
    assert hub.parse_model_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_an_id in ("embedded", "./org/name", "/abs/model", "a/b/c", "org/../x", "org/na me"):
        assert hub.parse_model_id(not_an_id) is None, not_an_id


def test_cache_root_follows_the_hugging_face_variables(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hf_cache_root() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hf_cache_root() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hub.hf_cache_root() == tmp_path / "user" / ".cache" / "huggingface" / "hub"


def test_an_incomplete_snapshot_is_not_used(hf_cache, tmp_path):
    root = tmp_path / "hf"
    snap = cache_repo(root, "tiny-org/half", hf_cache["models"]["llama"].path, _commit("half"), symlinks=False)
    (snap / "tokenizer.json").unlink()  # an interrupted download
    assert hub.cached_snapshot("tiny-org/half", None, root) is None
    (snap / "model.safetensors").rename(snap / "model-00001-of-00002.safetensors")
    shutil.copyfile(hf_cache["models"]["llama"].path / "tokenizer.json", snap / "tokenizer.json")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert hub.cached_snapshot("tiny-org/half", None, root) is None  # a shard is missing


def test_an_interrupted_conversion_is_never_reused(hf_cache, tmp_path, monkeypatch):
    """A local Hugging Face directory converts into the cache like an id; a conversion killed
    midway leaves only a .partial directory, which the next resolution discards."""
    from soljax.lm import convert as convert_mod

    src = hf_cache["models"]["llama"].path
    models = tmp_path / "models"
    real_save = convert_mod.save_model

    def dies_after_writing(out, cfg, params, tokenizer, source=""):
        real_save(out, cfg, params, tokenizer, source)
        raise KeyboardInterrupt  # killed after the files are written, before the rename

    monkeypatch.setattr(convert_mod, "save_model", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve_model(src, dtype="bfloat16", models_dir=models)
    [partial] = [p for p in (models / "local").iterdir() if p.name.endswith(".partial")]
    assert (partial / "model.json").is_file()
    dest = partial.with_name(partial.name[: -len(".partial")])
    assert not dest.exists()
    monkeypatch.setattr(convert_mod, "save_model", real_save)
    got = hub.resolve_model(src, dtype="bfloat16", models_dir=models)
    assert got == dest and (got / "model.json").is_file() and not partial.exists()
    cfg, _, _ = load_model(got)
    assert cfg.dtype == "bfloat16" and json.loads((got / "model.json").read_text())["source"] == str(src.resolve())
    # an already converted soljax directory is used as it is
    assert hub.resolve_model(got, dtype="float32", models_dir=models) == got


def test_online_download_fetches_only_what_conversion_reads(hf_cache, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    root = Path(os.environ["HF_HUB_CACHE"])
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(cache_repo(Path(kwargs["cache_dir"]), repo_id, hf_cache["models"]["llama"].path,
                              _commit(repo_id + "dl"), symlinks=True))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    snap = hub.snapshot("tiny-org/downloaded@main")
    [(repo_id, kwargs)] = calls
    assert repo_id == "tiny-org/downloaded" and kwargs["revision"] == "main" and Path(kwargs["cache_dir"]) == root
    assert set(kwargs["allow_patterns"]) >= {"config.json", "tokenizer.json", "model*.safetensors",
                                             "model.safetensors.index.json"}
    assert not any(p.endswith((".bin", ".pth", ".gguf")) or p == "*" for p in kwargs["allow_patterns"])
    assert hub.snapshot("tiny-org/downloaded") == snap and len(calls) == 1  # cached now

    def refused(repo_id, **kwargs):
        raise RuntimeError("401 Client Error: Unauthorized. Access to model tiny-org/gated is restricted.\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(SoljaxError) as e:
        hub.snapshot("tiny-org/gated")
    msg = str(e.value)
    assert "\n" not in msg and "HF_TOKEN" in msg and "401 Client Error" in msg and "hf download tiny-org/gated" in msg
