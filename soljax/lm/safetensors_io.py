"""Lazy, validating reader for (sharded) safetensors checkpoints, bf16 included."""

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
    """Maps tensor names to lazily loaded numpy arrays over every ``*.safetensors`` file of a dir."""

    def __init__(self, directory: Path):
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise SoljaxError(f"no *.safetensors files in {directory}")
        index = Path(directory) / "model.safetensors.index.json"
        if index.exists():
            try:
                wanted = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError) as e:
                raise SoljaxError(f"{index} is not a valid safetensors index: {e}") from None
            absent = sorted(wanted - {f.name for f in files})
            if absent:
                raise SoljaxError(f"{directory} is missing shards listed in its index: {absent}")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            header, data_start = _read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, info, data_start)

    def keys(self):
        return self._where.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, start = self._where[name]
        begin, end = info["data_offsets"]
        arr = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return arr.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


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
