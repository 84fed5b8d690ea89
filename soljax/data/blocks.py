"""Tokenized text blocks: the episodes soljax trains and evaluates on.

A *source* names some text:

* a split: ``"train"`` (five Austen novels), ``"eval"`` (*Persuasion*), ``"ood"`` (*Moby Dick*);
* a corpus name from :data:`soljax.data.assets.CORPORA`, e.g. ``"persuasion"``;
* a path to a UTF-8 text file, or to a directory whose ``*.txt`` files are read in name order;
* ``hf:DATASET[:CONFIG][:SPLIT][:FIELD]``: a Hugging Face dataset (needs ``datasets``, and the
  network or its local cache); SPLIT defaults to ``train`` and FIELD to ``text``. It is streamed:
  only the first ``max_docs`` rows are read (default :data:`HF_MAX_DOCS`, the reference's
  1,000,000; ``None`` reads the whole split), empty and whitespace-only texts among them are
  skipped, and the texts are tokenized batch by batch as they arrive, so only token ids accumulate.

Split and corpus names win over paths of the same name (write ``./train`` for a directory).
Each text (file, novel or dataset row) is one document; documents are tokenized without special
tokens, in batches of :data:`TOKENIZE_BATCH` texts, and concatenated without separators, then cut into non-overlapping blocks of
``context_len + rollout_len + 1`` tokens starting at token 0 (the remainder is dropped).

The tokenizer is any object with ``encode(text) -> list[int]`` (no special tokens added), optionally
``encode_batch(texts) -> list[list[int]]`` (used when present), and a ``fingerprint`` string
identifying its vocabulary; token ids are cached as ``.npy`` files under
``<cache>/tokens/`` keyed by the source's content and that fingerprint.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from soljax.data import assets
from soljax.errors import SoljaxError

SPLITS = {
    "train": ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility"),
    "eval": ("persuasion",),
    "ood": ("mobydick",),
}
#: Default cap on the number of rows read from a Hugging Face dataset (the reference's Dolma cap).
HF_MAX_DOCS = 1_000_000
#: Texts tokenized per call of the tokenizer's batch encoder (the reference's batch).
TOKENIZE_BATCH = 512
_CACHE_FORMAT = "soljax-tokens-v1"


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SoljaxError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise SoljaxError(f"cannot read {path}: {e.strerror}") from e


def _read_corpus(name: str, cache: Path | str | None) -> str:
    path = assets.text_path(name, cache)
    if not path.is_file():
        raise SoljaxError(
            f"missing text corpus {path}: fetch it with soljax.data.assets.fetch_corpora() "
            "(the setup step), or put any UTF-8 text file there"
        )
    return read_text_file(path)


def parse_hf_source(source: str) -> tuple[str, str | None, str, str]:
    """Split ``hf:DATASET[:CONFIG][:SPLIT][:FIELD]`` into (dataset, config, split, field)."""
    parts = source[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 4:
        raise SoljaxError(f"bad data source {source!r}: expected hf:DATASET[:CONFIG][:SPLIT][:FIELD]")
    parts += [""] * (4 - len(parts))
    return parts[0], parts[1] or None, parts[2] or "train", parts[3] or "text"


_END = object()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _open_hf(source: str, name: str, config: str | None, split: str) -> Iterator[Any]:
    """The rows of a dataset split, streamed when possible (reads only what it needs), else from
    the local ``datasets`` cache (memory-mapped, not held as text); the first row is fetched here
    so that an unreachable dataset fails before anything is tokenized."""
    try:
        import datasets
    except ImportError as e:
        raise SoljaxError(f"data source {source!r} needs the `datasets` package: "
                          "pip install 'soljax[data]' (or pip install datasets)") from e
    errors = []
    for streaming in (True, False):
        try:
            rows = iter(datasets.load_dataset(name, config, split=split, streaming=streaming))
            first = next(rows, _END)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds of errors
            errors.append(_first_line(e))
            continue
        return iter(()) if first is _END else itertools.chain([first], rows)
    raise SoljaxError(
        f"cannot load Hugging Face dataset {source!r} ({errors[-1]}); it needs the network "
        "or a local datasets cache"
    )


def iter_hf_texts(source: str, max_docs: int | None = HF_MAX_DOCS) -> Iterator[str]:
    """The non-empty texts among the first ``max_docs`` rows (``None``: all) of an ``hf:`` source,
    one at a time as the stream delivers them; empty and whitespace-only texts are skipped."""
    name, config, split, field = parse_hf_source(source)
    if max_docs is not None:
        _check_positive("max_docs", max_docs)
    rows = itertools.islice(_open_hf(source, name, config, split), max_docs)
    found = 0
    while True:
        try:
            row = next(rows, _END)
        except Exception as e:  # noqa: BLE001 - a stream can fail midway (network, corrupt shard)
            raise SoljaxError(f"reading {source!r} failed after {found} texts: {_first_line(e)}") from e
        if row is _END:
            break
        if field not in row:
            raise SoljaxError(f"{source!r}: rows have no field {field!r} (fields: {', '.join(row)})")
        text = row[field]
        if isinstance(text, str) and text.strip():
            found += 1
            yield text
    if not found:
        raise SoljaxError(f"{source!r} has no non-empty {field!r} texts")


def iter_texts(source: str | os.PathLike, cache: Path | str | None = None, *,
               max_docs: int | None = HF_MAX_DOCS) -> Iterator[str]:
    """The documents of ``source`` one at a time (an ``hf:`` source is streamed; see the module
    docstring)."""
    src = os.fspath(source)
    if isinstance(src, str) and src.startswith("hf:"):
        return iter_hf_texts(src, max_docs)
    return iter(read_texts(src, cache))


def read_texts(source: str | os.PathLike, cache: Path | str | None = None, *,
               max_docs: int | None = HF_MAX_DOCS) -> list[str]:
    """The documents of ``source`` (see the module docstring), one string per document.

    ``max_docs`` caps how many rows a Hugging Face source reads (``None``: all). This holds every
    text at once: large sources are tokenized from :func:`iter_texts` instead.
    """
    src = os.fspath(source)
    if isinstance(src, str) and src.startswith("hf:"):
        return list(iter_hf_texts(src, max_docs))
    if src in SPLITS:
        return [_read_corpus(name, cache) for name in SPLITS[src]]
    if src in assets.CORPORA:
        return [_read_corpus(src, cache)]
    path = Path(src).expanduser()
    if path.is_file():
        return [read_text_file(path)]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise SoljaxError(f"directory {path} holds no .txt files")
        return [read_text_file(p) for p in files]
    raise SoljaxError(
        f"data source {src!r} is not a split ({', '.join(SPLITS)}), a corpus "
        f"({', '.join(assets.CORPORA)}), an existing file or directory, or hf:DATASET"
    )


def _encode_batch(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """The concatenated token ids (int32) of one batch of texts."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = encode_batch(texts) if callable(encode_batch) else [tokenizer.encode(t) for t in texts]
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise SoljaxError("tokenizer returned ids outside the int32 range")
    return ids.astype(np.int32)


def tokenize_texts(tokenizer: Any, texts: Iterable[str], batch_size: int = TOKENIZE_BATCH) -> np.ndarray:
    """Token ids of all ``texts``, each encoded without special tokens, concatenated (int32).

    ``texts`` may be any iterable (a stream): it is consumed ``batch_size`` texts at a time, and
    only the int32 ids of the batches done are kept.
    """
    _check_positive("batch_size", batch_size)
    chunks = []
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_size)):
        chunks.append(_encode_batch(tokenizer, batch))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int32)


def make_blocks(ids: np.ndarray, block_len: int) -> np.ndarray:
    """Cut ``ids`` into non-overlapping ``[N, block_len]`` int32 blocks from token 0.

    Block i is ``ids[i*block_len:(i+1)*block_len]``; a trailing partial block is dropped.
    """
    _check_positive("block_len", block_len)
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise SoljaxError(f"token ids must be 1-D, got shape {ids.shape}")
    n = len(ids) // block_len
    if n < 1:
        raise SoljaxError(f"need at least one block of {block_len} tokens, the text has only {len(ids)}")
    return ids[: n * block_len].reshape(n, block_len).astype(np.int32)


def shuffle_blocks(blocks: np.ndarray, seed: int) -> np.ndarray:
    """``blocks`` in a permuted order that depends only on ``seed`` and the number of blocks."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SoljaxError(f"seed must be a non-negative integer, got {seed!r}")
    perm = np.random.default_rng(int(seed)).permutation(len(blocks))
    return blocks[perm]


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise SoljaxError(f"{name} must be a positive integer, got {value!r}")


def _token_cache_file(source: str, texts: list[str] | None, fingerprint: str, cache: Path | str | None,
                      max_docs: int | None) -> Path:
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{fingerprint}\0".encode())
    if texts is None:  # remote source: keyed by its name
        h.update(f"{source}\0{max_docs}".encode())
    else:  # local source: keyed by its content, so edited files are re-tokenized
        for t in texts:
            b = t.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).name if not source.startswith("hf:") else source)
    root = Path(cache) if cache is not None else assets.cache_dir()
    return root / "tokens" / f"{label[:40]}-{h.hexdigest()[:20]}.npy"


def load_token_ids(source: str | os.PathLike, tokenizer: Any, *, cache: Path | str | None = None,
                   max_docs: int | None = HF_MAX_DOCS) -> np.ndarray:
    """Token ids of ``source`` (int32, 1-D), from the token cache when possible.

    An ``hf:`` source is keyed by its name and ``max_docs`` and, on a miss, streamed through the
    tokenizer (see the module docstring)."""
    src = os.fspath(source)
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise SoljaxError("the tokenizer has no `fingerprint` string identifying its vocabulary")
    remote = src.startswith("hf:")
    if remote and max_docs is not None:
        _check_positive("max_docs", max_docs)
    texts = None if remote else read_texts(src, cache)
    path = _token_cache_file(src, texts, fingerprint, cache, max_docs)
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # unreadable cache entry: rebuild it
    ids = tokenize_texts(tokenizer, iter_hf_texts(src, max_docs) if texts is None else texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    with open(tmp, "wb") as f:
        np.save(f, ids)
    os.replace(tmp, path)
    return ids


def load_blocks(source: str | os.PathLike, tokenizer: Any, *, context_len: int, rollout_len: int,
                seed: int | None = None, max_blocks: int | None = None,
                cache: Path | str | None = None, max_docs: int | None = HF_MAX_DOCS) -> np.ndarray:
    """Blocks ``[N, context_len + rollout_len + 1]`` (int32) of ``source``'s tokens (``max_docs``:
    rows read from an ``hf:`` source, ``None`` for all).

    Blocks are cut from token 0; they are shuffled by ``seed`` when it is given, then truncated to
    the first ``max_blocks``.
    """
    _check_positive("context_len", context_len)
    _check_positive("rollout_len", rollout_len)
    if max_blocks is not None:
        _check_positive("max_blocks", max_blocks)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise SoljaxError(f"seed must be a non-negative integer or None, got {seed!r}")
    ids = load_token_ids(source, tokenizer, cache=cache, max_docs=max_docs)
    blocks = make_blocks(ids, context_len + rollout_len + 1)
    if seed is not None:
        blocks = shuffle_blocks(blocks, seed)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return blocks
