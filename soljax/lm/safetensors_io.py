"""Lazy, validating reader for (sharded) safetensors checkpoints, bf16 included.

Tensors are read from the files on demand, a block of rows at a time if asked
(:meth:`SafetensorsDir.rows`), so converting a checkpoint never holds more of it than one block.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from soljax.errors import SoljaxError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsDir:
    """Maps tensor names to lazily read numpy arrays over the ``*.safetensors`` files of a dir
    (only the shards its ``model.safetensors.index.json`` lists, when it has one)."""

    def __init__(self, directory: Path):
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise SoljaxError(f"no *.safetensors files in {directory}")
        index = Path(directory) / "model.safetensors.index.json"
        if index.exists():
            try:
                wanted = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise SoljaxError(f"{index} is not a valid safetensors index: {e}") from None
            absent = sorted(wanted - {f.name for f in files})
            if absent:
                raise SoljaxError(f"{directory} is missing shards listed in its index: {absent}")
            files = [f for f in files if f.name in wanted]  # e.g. a consolidated copy beside the shards
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            header, data_start = _read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, info, data_start)

    def keys(self):
        return self._where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (along the first axis) of tensor ``name``, in its stored dtype, read
        from the file into a new array (nothing stays mapped)."""
        path, info, data_start = self._where[name]
        shape = tuple(info["shape"])
        dtype = np.dtype(_DTYPES[info["dtype"]])
        if not shape:
            start, stop = 0, 1
        row = math.prod(shape[1:]) * dtype.itemsize
        begin = info["data_offsets"][0] + start * row
        raw = np.fromfile(path, dtype=np.uint8, count=(stop - start) * row, offset=data_start + begin)
        return raw.view(dtype).reshape((stop - start, *shape[1:]) if shape else ())

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0] if shape else 1)


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise SoljaxError(f"{path} is not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SoljaxError(f"{path} is truncated or corrupt (header length {n} > file size)")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise SoljaxError(f"{path} is corrupt (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise SoljaxError(f"{path} is corrupt (its header is a JSON {type(header).__name__}, not an object)")
    data_start, data_len = 8 + n, size - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = list(info["shape"])
            dtype = np.dtype(_DTYPES[info["dtype"]])
        except (KeyError, TypeError, ValueError):
            raise SoljaxError(f"{path} is corrupt (bad entry for tensor {name!r})") from None
        if not all(_is_int(x) for x in (begin, end, *shape)) or min(shape, default=0) < 0:
            raise SoljaxError(f"{path} is corrupt (bad entry for tensor {name!r})")
        count = math.prod(shape)
        if begin < 0 or end < begin:
            raise SoljaxError(f"{path} is corrupt: tensor {name!r} has data_offsets [{begin}, {end}] "
                              "(need 0 <= begin <= end)")
        if end > data_len:
            raise SoljaxError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
        if end - begin != count * dtype.itemsize:
            raise SoljaxError(f"{path} is corrupt: tensor {name!r} has the wrong byte length")
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < prev_end:
            raise SoljaxError(f"{path} is corrupt: the data of tensors {prev!r} and {name!r} overlap")
    return header, data_start


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
