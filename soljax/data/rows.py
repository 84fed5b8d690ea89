"""Evaluation text read row by row, the way the reference reads WikiText-2 for perplexity.

The reference's perplexity data is ``wikitext`` / ``wikitext-2-raw-v1``, split ``validation``: the
first :data:`MAX_ROWS` rows of the split are read, rows that are empty (or only whitespace) are
skipped, the rest are tokenized without special tokens in batches of :data:`TOKENIZE_BATCH` and
concatenated without any separator, then cut from token 0 into non-overlapping blocks of
``M + T + 1`` tokens (the remainder is dropped). Evaluation takes the blocks in order, unshuffled,
in whole batches (the reference's loader drops a last partial batch).

:func:`read_rows` reads the same way from any of these sources:

* ``None``: WikiText-2 validation through ``datasets`` (online, or from its local cache);
* ``hf:DATASET[:CONFIG][:SPLIT][:FIELD]``: another Hugging Face dataset, the same way;
* a local text file: its lines are the rows (line ends kept, as WikiText's rows keep theirs), so
  the raw ``wiki.valid.raw`` file gives the same rows as the Hugging Face split;
* a text corpus name of :mod:`soljax.data.assets` (``persuasion``, ...) or a split name
  (``eval``, ...): the corpus files' lines, in order;
* a local dataset directory: one written by ``datasets``' ``save_to_disk`` (a dataset, or a dataset
  dict holding the split), or a directory of the split's data files (``<split>*.parquet``,
  ``.jsonl``, ``.json``, ``.csv`` or ``.arrow``, e.g. a copy of the hub's ``wikitext-2-raw-v1/``).

Each read says what it read and whether that is WikiText-2 validation (the hub dataset; a saved
dataset whose info names ``wikitext`` / ``wikitext-2-raw-v1`` and the split; a data-file directory
named ``wikitext-2-raw-v1``), so a report can say when its numbers are not the paper's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from soljax.data import assets
from soljax.data.blocks import SPLITS, make_blocks, parse_hf_source, read_text_file
from soljax.errors import SoljaxError

WIKITEXT2 = "hf:wikitext:wikitext-2-raw-v1:validation:text"
MAX_ROWS = 2000
TOKENIZE_BATCH = 512
DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
PASS_DATA = ("pass --data PATH: a local text file (its lines are the rows), or a dataset directory (written by "
             "datasets' save_to_disk, or holding the validation split's parquet/json/csv files)")


@dataclasses.dataclass(frozen=True)
class EvalRows:
    """The non-empty ``rows`` (in order) of the first ``rows_read`` rows of ``source``;
    ``description`` says in words what was read; ``wikitext2``: whether it is WikiText-2 validation."""

    rows: tuple[str, ...]
    rows_read: int
    source: str
    description: str
    wikitext2: bool


def _keep(texts: Iterable[Any], max_rows: int, field: str, where: str) -> tuple[tuple[str, ...], int]:
    """The non-empty texts among the first ``max_rows`` rows (dicts with ``field``, or strings)."""
    kept, n = [], 0
    for row in itertools.islice(texts, max_rows):
        n += 1
        if isinstance(row, dict):
            if field not in row:
                raise SoljaxError(f"{where}: rows have no field {field!r} (fields: {', '.join(map(str, row))})")
            row = row[field]
        if isinstance(row, str) and row.strip():
            kept.append(row)
    if not kept:
        raise SoljaxError(f"{where}: the first {max_rows} rows hold no non-empty text")
    return tuple(kept), n


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise SoljaxError(f"reading Hugging Face datasets needs the `datasets` package (pip install datasets); "
                          f"or {PASS_DATA}") from e
    return datasets


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _read_hub(source: str, max_rows: int) -> EvalRows:
    name, config, split, field = parse_hf_source(source)
    datasets = _datasets()
    errors = []
    for streaming in (True, False):  # streaming reads only the first rows; the plain load uses the local cache
        try:
            rows = datasets.load_dataset(name, config, split=split, streaming=streaming)
            kept, n = _keep(rows, max_rows, field, source)
        except SoljaxError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds of errors
            errors.append(_first_line(e))
            continue
        wiki = source == WIKITEXT2
        what = "WikiText-2 validation" if wiki else f"Hugging Face dataset {name}" + (f"/{config}" if config else "")
        return EvalRows(kept, n, source, f"{what} ({source}, through `datasets`)", wiki)
    what = "WikiText-2 validation (wikitext / wikitext-2-raw-v1)" if source == WIKITEXT2 else repr(source)
    raise SoljaxError(f"{what} is not available ({errors[-1]}): go online, put it in the local datasets cache, or "
                      f"{PASS_DATA}")


def _lines(text: str) -> list[str]:
    """The lines of ``text`` with their line ends (universal newlines were applied on reading)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _read_saved(path: Path, split: str, field: str, max_rows: int) -> EvalRows:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise SoljaxError(f"cannot load the saved dataset {path}: {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SoljaxError(f"the saved dataset {path} has no {split!r} split (it has {', '.join(ds)})")
        ds = ds[split]
    kept, n = _keep(ds, max_rows, field, str(path))
    info = ds.info
    wiki = (info.dataset_name == "wikitext" and info.config_name == "wikitext-2-raw-v1"
            and str(ds.split or split) == "validation" and split == "validation")
    named = f"{info.dataset_name}/{info.config_name}" if info.dataset_name else "unnamed"
    return EvalRows(kept, n, str(path), f"the saved dataset {path} ({named}, split {ds.split or split}, "
                                        f"field {field!r})", wiki)


def _read_data_files(path: Path, split: str, field: str, max_rows: int) -> EvalRows:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(split)
                   and p.suffix in DATA_FILE_BUILDERS)
    if not files:
        raise SoljaxError(f"{path} is neither a text file, a saved dataset (no dataset_info.json or "
                          f"dataset_dict.json) nor a directory of {split!r} data files ({split}*.parquet, .jsonl, "
                          f".json, .csv or .arrow)")
    builders = {DATA_FILE_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise SoljaxError(f"{path} mixes data file formats for split {split!r}: {', '.join(p.name for p in files)}")
    datasets = _datasets()
    try:
        rows = datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train",
                                     streaming=True)
        kept, n = _keep(rows, max_rows, field, str(path))
    except SoljaxError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SoljaxError(f"cannot read the data files in {path}: {_first_line(e)}") from None
    wiki = path.name == "wikitext-2-raw-v1" and split == "validation"
    return EvalRows(kept, n, str(path), f"the data files {', '.join(p.name for p in files)} in {path} "
                                        f"(field {field!r})", wiki)


def read_rows(source: str | os.PathLike | None = None, *, max_rows: int = MAX_ROWS, split: str = "validation",
              field: str = "text", cache: Path | str | None = None) -> EvalRows:
    """The non-empty rows among the first ``max_rows`` rows of ``source`` (see the module doc);
    ``split`` and ``field`` apply to local dataset directories."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise SoljaxError(f"the row cap must be a positive integer, got {max_rows!r}")
    if source is None:
        return _read_hub(WIKITEXT2, max_rows)
    src = os.fspath(source)
    if src.startswith("hf:"):
        return _read_hub(src, max_rows)
    if src in SPLITS or src in assets.CORPORA:
        names = SPLITS.get(src, (src,))
        paths = [assets.text_path(n, cache) for n in names]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise SoljaxError(f"missing text corpus {missing[0]}: run `soljax setup`, or {PASS_DATA}")
        kept, n = _keep((ln for p in paths for ln in _lines(read_text_file(p))), max_rows, "text", src)
        return EvalRows(kept, n, src, f"the lines of the soljax corpus {src!r} ({', '.join(names)})", False)
    path = Path(src).expanduser()
    if path.is_file():
        kept, n = _keep(_lines(read_text_file(path)), max_rows, "text", str(path))
        return EvalRows(kept, n, str(path), f"the lines of the text file {path}", False)
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _read_saved(path, split, field, max_rows)
        return _read_data_files(path, split, field, max_rows)
    raise SoljaxError(f"evaluation data {src!r} is not an existing file or directory, a soljax corpus or split, or "
                      f"hf:DATASET[:CONFIG][:SPLIT][:FIELD]")


def tokenize_rows(tokenizer: Any, rows: Sequence[str], batch: int = TOKENIZE_BATCH) -> np.ndarray:
    """Token ids (int32) of ``rows``, each tokenized without special tokens (in batches of ``batch``
    when the tokenizer has ``encode_batch``), concatenated without separators."""
    parts: list[list[int]] = []
    for i in range(0, len(rows), batch):
        chunk = list(rows[i:i + batch])
        if hasattr(tokenizer, "encode_batch"):
            parts += tokenizer.encode_batch(chunk)
        else:
            parts += [tokenizer.encode(t) for t in chunk]
    ids = np.fromiter(itertools.chain.from_iterable(parts), np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise SoljaxError("the tokenizer returned ids outside the int32 range")
    return ids.astype(np.int32)


def eval_batches(ids: np.ndarray, block_len: int, batch_size: int, max_batches: int) -> np.ndarray:
    """The first ``max_batches`` whole batches of ``batch_size`` unshuffled blocks
    ``[n * batch_size, block_len]`` of ``ids`` (fewer batches when the text is short)."""
    for name, v in (("the batch size", batch_size), ("the number of batches", max_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SoljaxError(f"{name} must be a positive integer, got {v!r}")
    n = len(ids) // block_len
    if n < batch_size:
        raise SoljaxError(f"the evaluation text gives {len(ids)} tokens = {n} blocks of {block_len}: fewer than one "
                          f"batch of {batch_size} blocks (give more text, a smaller --batch-size or a shorter "
                          f"--prefix)")
    batches = min(max_batches, n // batch_size)
    return make_blocks(ids, block_len)[:batches * batch_size]
