"""Lazy, validating reader for (sharded) safetensors checkpoints, bf16 included."""

from __future__ import annotations

import json
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
    data_start, data_len = 8 + n, size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            count = int(np.prod(info["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError):
            raise SoljaxError(f"{path} is corrupt (bad entry for tensor {name!r})") from None
        if end > data_len:
            raise SoljaxError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
        if end - begin != count * dtype.itemsize:
            raise SoljaxError(f"{path} is corrupt: tensor {name!r} has the wrong byte length")
    return header, data_start
