"""Building and loading soljax's C++ CPU kernels (XLA FFI handlers, ``soljax/kernels/*.cc``).

A kernel's source is compiled on first use with the system's C++ compiler (``$CXX``, default
``g++``) for the machine it runs on (``-O3 -march=native``), against the XLA FFI headers that
jaxlib ships (``jax.ffi.include_dir()``), into a cache directory (``$SOLJAX_KERNEL_CACHE``, default
``~/.cache/soljax/kernels``; a folder under the temporary directory where that cannot be made)
under a name that hashes the source, the headers beside it, the flags, jaxlib's version and the
processor's features, so a changed source, jaxlib or machine gets its own build. Concurrent
processes may build the same kernel: each writes its own file and renames it into place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from soljax.errors import SoljaxError

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")
SOURCES = Path(__file__).parent


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("SOLJAX_KERNEL_CACHE") or Path.home() / ".cache" / "soljax" / "kernels")


def build(source: str) -> Path:
    """The shared library of ``soljax/kernels/<source>``, compiled if no cached build matches."""
    src = SOURCES / source
    cxx = os.environ.get("CXX", "g++")
    headers = [h.read_text() for h in sorted(SOURCES.glob("*.h"))]
    parts = [src.read_text(), *headers, cxx, *FLAGS, jaxlib.__version__, platform.machine(), _cpu_features()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    out = cache_dir() / f"{src.stem}-{key[:16]}.so"
    if out.is_file():
        return out
    if shutil.which(cxx) is None:
        raise SoljaxError(f"the CPU kernel {source} needs a C++ compiler: {cxx!r} is not on PATH (install g++, "
                          "set $CXX, or use impl 'xla')")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable home: a per-user folder under the temporary directory
        out = Path(tempfile.gettempdir()) / f"soljax-kernels-{os.getuid()}" / out.name
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(src), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise SoljaxError(f"building the CPU kernel {source} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def check_inputs(kernel: str, other_impls: str, **arrays) -> None:
    """A CPU kernel's preconditions, as clear errors: the CPU backend and float32 ``arrays``."""
    if jax.default_backend() != "cpu":
        raise SoljaxError(f"the {kernel} runs on the CPU (backend is {jax.default_backend()!r}): use {other_impls}")
    for name, a in arrays.items():
        if a.dtype != jnp.float32:
            raise SoljaxError(f"the {kernel} reads float32, got {name} in {a.dtype}")


@functools.cache
def register(source: str, symbol: str) -> str:
    """Builds ``source`` (once per process), registers its FFI handler ``symbol`` for the CPU and
    returns the target name to call."""
    lib = ctypes.cdll.LoadLibrary(str(build(source)))
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return symbol
