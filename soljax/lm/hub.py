"""Model names resolved to soljax model directories: local paths, the Hugging Face cache, downloads.

Wherever soljax takes a model (``model:`` in configs, ``--model``, ``soljax convert --from``), the
name is, in the order tried:

* a local path: a soljax model directory (``model.json``), used as it is; a Hugging Face model
  directory (``config.json``, safetensors, ``tokenizer.json``) or a ``.gguf`` file;
* a Hugging Face id ``org/name`` or ``org/name@revision`` (a branch, tag or commit; default
  ``main``), looked up in the local Hugging Face cache (:func:`hf_cache_root`, layout
  ``models--org--name/snapshots/<commit>/`` with ``refs/<branch>`` holding the commit), which
  works offline; else downloaded with ``huggingface_hub`` (only the config, tokenizer and
  safetensors files; gated models read the standard ``HF_TOKEN``), unless ``HF_HUB_OFFLINE`` is
  set. Not cached and not downloadable is one :class:`SoljaxError` line naming the command that
  downloads it and the directory it goes to.

Anything but a soljax model directory is converted once per (source, commit or file fingerprint,
dtype) into ``<models_dir>/hf/org--name/<commit>-<dtype>`` or ``<models_dir>/local/...`` and reused
afterwards. A conversion is written to a ``.partial`` directory and renamed into place when
complete, under a lock, so an interrupted conversion is never reused and concurrent processes
convert once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from soljax.errors import SoljaxError

#: The files a download fetches (everything :func:`soljax.lm.convert.read_hf` reads).
DOWNLOAD_PATTERNS = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                     "model*.safetensors", "model.safetensors.index.json")

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)(?:@(?P<rev>[A-Za-z0-9_./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


def parse_model_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` of ``org/name[@revision]``; None for anything else."""
    m = _ID.match(str(name))
    if m is None or m["repo"].startswith(".") or ".." in m["repo"] or "--" in m["repo"]:
        return None
    return m["repo"], m["rev"]


def hf_cache_root() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (as huggingface_hub)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return xdg / "huggingface" / "hub"


def repo_cache_dir(repo_id: str, root: Path | None = None) -> Path:
    """Where the cache keeps ``repo_id``: ``<root>/models--org--name``."""
    return (root or hf_cache_root()) / ("models--" + repo_id.replace("/", "--"))


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def is_complete_snapshot(path: Path) -> bool:
    """Whether an HF directory has a config, a tokenizer and every safetensors shard it needs."""
    path = Path(path)
    if not ((path / "config.json").is_file() and (path / "tokenizer.json").is_file()):
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(shards) and all((path / s).is_file() for s in shards)
    return any(p.is_file() for p in path.glob("*.safetensors"))


def cached_snapshot(repo_id: str, revision: str | None = None, root: Path | None = None) -> Path | None:
    """The complete cached snapshot of ``repo_id`` at ``revision`` (a branch or tag through
    ``refs/``, or a 40-digit commit; default ``main``), or None. Never touches the network."""
    repo = repo_cache_dir(repo_id, root)
    rev = revision or "main"
    ref = repo / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
    elif _COMMIT.match(rev):
        commit = rev
    else:
        return None
    snap = repo / "snapshots" / commit
    return snap if commit and is_complete_snapshot(snap) else None


def download_hint(repo_id: str, revision: str | None, root: Path) -> str:
    """How to put ``repo_id`` into the cache by hand (one line)."""
    rev = f" --revision {revision}" if revision else ""
    return (f"download it where the network is reachable (hf download {repo_id}{rev} --include '*.json' "
            f"--include 'model*.safetensors'; or huggingface-cli download) and put "
            f"{repo_cache_dir(repo_id, Path('.')).name} in {root} (HF_HUB_CACHE), or pass a local model "
            "directory")


def snapshot(name: str) -> Path:
    """The local Hugging Face directory of id ``name`` (``org/name[@revision]``): the cached
    snapshot, else a fresh download (see the module docstring); a clear error otherwise."""
    parsed = parse_model_id(name)
    if parsed is None:
        raise SoljaxError(f"{name!r} is not a Hugging Face model id (org/name or org/name@revision)")
    repo_id, revision = parsed
    root = hf_cache_root()
    found = cached_snapshot(repo_id, revision, root)
    if found is not None:
        return found
    where = f"{name} is not a local path and not in the Hugging Face cache {root}"
    if offline():
        raise SoljaxError(f"{where}, and HF_HUB_OFFLINE is set: {download_hint(repo_id, revision, root)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SoljaxError(f"{where}, and huggingface_hub is not installed to download it (pip install "
                          f"huggingface_hub): {download_hint(repo_id, revision, root)}") from None
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=root,
                                      allow_patterns=list(DOWNLOAD_PATTERNS)))
    except Exception as e:  # network, authentication, missing repo or revision: all one line
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        gated = " (a gated model needs access granted and HF_TOKEN set)" if "401" in str(e) or "gated" in str(
            e).lower() else ""
        raise SoljaxError(f"{where}, and downloading it failed{gated}: {why}; "
                          f"{download_hint(repo_id, revision, root)}") from None
    if not is_complete_snapshot(path):
        raise SoljaxError(f"{name}: the download in {path} has no config.json, tokenizer.json or safetensors "
                          "weights (soljax converts safetensors checkpoints with a tokenizer.json)")
    return path


def source_path(name: str | Path) -> Path:
    """What ``soljax convert --from`` reads: an existing local path as it is, else the Hugging
    Face directory of the id ``name`` (see :func:`snapshot`)."""
    path = Path(name).expanduser()
    if path.exists() or parse_model_id(str(name)) is None:
        return path
    return snapshot(str(name))


def _fingerprint(src: Path) -> str:
    """A short hash of a local source's path, and of its files' names, sizes and modification times."""
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _is_convertible(path: Path) -> bool:
    return (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix.lower() == ".gguf")


def resolve_model(name: str | Path, *, dtype: str, models_dir: Path,
                  say: Callable[[str], None] | None = None) -> Path:
    """The soljax model directory for model ``name`` (see the module docstring), converting the
    source into ``models_dir`` in ``dtype`` the first time. A path that exists but is none of the
    convertible kinds is returned as is (loading it then says what is missing)."""
    path = Path(name).expanduser()
    if path.exists():
        if (path / "model.json").is_file() or not _is_convertible(path):
            return path
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem if path.is_file() else path.name) or "model"
        return convert_once(path, Path(models_dir) / "local" / f"{base}-{_fingerprint(path)}-{dtype}", dtype,
                            source=str(path.resolve()), say=say)
    parsed = parse_model_id(str(name))
    if parsed is None:
        raise SoljaxError(f"model not found: {name} (expected a soljax model directory, a Hugging Face model "
                          "directory or .gguf file, or a Hugging Face id org/name[@revision])")
    snap = snapshot(str(name))
    dest = Path(models_dir) / "hf" / parsed[0].replace("/", "--") / f"{snap.name}-{dtype}"
    return convert_once(snap, dest, dtype, source=f"{parsed[0]}@{snap.name}", say=say)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` (created if needed) where the platform has one."""
    try:
        import fcntl
    except ImportError:  # no advisory locks: conversions are still atomic, only not deduplicated
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_once(src: Path, dest: Path, dtype: str, *, source: str = "",
                 say: Callable[[str], None] | None = None) -> Path:
    """``dest``, converting ``src`` into it (in ``dtype``) unless a complete conversion is there."""
    from soljax.lm.convert import convert

    if (dest / "model.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        if (dest / "model.json").is_file():  # another process converted it meanwhile
            return dest
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted conversion
        shutil.rmtree(dest, ignore_errors=True)  # incomplete: model.json is missing
        if say is not None:
            say(f"converting {source or src} ({dtype}) into {dest}")
        convert(src, partial, dtype=dtype, quiet=True, source=source)
        partial.rename(dest)  # model.json appears only once everything is written
    return dest
