"""A converted model directory: ``model.json`` (config), ``tokenizer.json``, ``params/`` (orbax).

Parameters always restore against an abstract tree built from the config (shapes, dtypes and,
when given, shardings), so a model saved on one device layout loads onto any other, and in any
dtype: orbax casts while reading, so loading a float32 model in bfloat16 never holds it in float32.

A conversion writes host (numpy) parameters with :func:`save_host_params`: no copy of the tree is
made while writing, and each array goes to disk in chunks of at most :data:`HOST_CHUNK_BYTES`
(one directory per array rather than orbax's single OCDBT store, which buffers everything until it
commits). Both layouts restore the same way.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax

from soljax.errors import SoljaxError
from soljax.lm.config import LMConfig
from soljax.lm.params import abstract_params, param_shapes
from soljax.lm.tokenizer import Tokenizer

FORMAT = "soljax-lm"
VERSION = 1
#: Largest chunk a converted array is written in (and later read in).
HOST_CHUNK_BYTES = 64 * 2**20


@contextlib.contextmanager
def _checkpointer():
    """An orbax checkpointer whose background threads are released on exit."""
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    try:
        yield ckpt
    finally:
        ckpt.close()


def save_params(path: Path, params) -> None:
    """Writes a parameter pytree with orbax (overwrites)."""
    with _checkpointer() as ckpt:
        ckpt.save(Path(path).absolute(), params, force=True)
        ckpt.wait_until_finished()


def save_host_params(path: Path, params) -> None:
    """Writes a pytree of numpy arrays with orbax (overwrites), without copying it: arrays are
    written in place in chunks of at most :data:`HOST_CHUNK_BYTES`, so the peak memory is the tree
    plus a few chunks. Restores with :func:`restore_params` like :func:`save_params`' checkpoints."""
    import numpy as np
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=HOST_CHUNK_BYTES), params)
    ckpt = ocp.Checkpointer(handler)
    try:
        ckpt.save(Path(path).absolute(), args=ocp.args.PyTreeSave(params, save_args=save_args), force=True)
    finally:
        ckpt.close()


def restore_params(path: Path, target):
    """Restores a pytree saved by :func:`save_params` onto ``target`` (an abstract tree).

    Structure and shapes are checked against the checkpoint's metadata first, so a mismatch is
    one clear error rather than a failed read.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise SoljaxError(f"parameter checkpoint not found: {path}")
    with _checkpointer() as ckpt:
        return _restore(ckpt, path, target)


def _restore(ckpt, path: Path, target):
    try:
        meta = ckpt.metadata(path)
        stored = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if stored is None:
            raise SoljaxError(f"cannot restore parameters from {path}: its metadata is unreadable "
                              "(corrupt or not an orbax checkpoint)")
        _check_against(stored, target, path)
        return ckpt.restore(path, target)
    except SoljaxError:
        raise
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0].split(" [")[0][:300]
        raise SoljaxError(f"cannot restore parameters from {path} (corrupt or incompatible "
                          f"checkpoint): {first}") from None


def _check_against(stored, target, path: Path) -> None:
    flat_stored = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    flat_target = dict(jax.tree_util.tree_flatten_with_path(target)[0])
    if set(flat_stored) != set(flat_target):
        diff = sorted(jax.tree_util.keystr(k) for k in set(flat_stored) ^ set(flat_target))
        raise SoljaxError(f"checkpoint {path} does not match the model: differing entries {diff[:4]}")
    for key, want in flat_target.items():
        have = tuple(flat_stored[key].shape)
        if have != tuple(want.shape):
            raise SoljaxError(f"checkpoint {path} does not match the model: "
                              f"{jax.tree_util.keystr(key)} has shape {have}, expected {tuple(want.shape)}")


def save_model(out: Path, cfg: LMConfig, params, tokenizer: Tokenizer, source: str = "") -> None:
    """Writes a model directory; ``params`` are device arrays or, from a conversion, numpy arrays
    (written without a copy, see :func:`save_host_params`)."""
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    host = all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
    (save_host_params if host else save_params)(out / "params", params)
    tokenizer.save(out / "tokenizer.json")
    meta = {"format": FORMAT, "version": VERSION, "source": source, "config": cfg.to_dict()}
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_config(directory: Path) -> LMConfig:
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        hint = " (run `soljax convert` first)" if directory.exists() else ""
        raise SoljaxError(f"not a soljax model directory: {meta_path} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise SoljaxError(f"{meta_path} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SoljaxError(f"{meta_path} is not a soljax model description")
    if not isinstance(meta.get("config"), dict):
        raise SoljaxError(f"{meta_path} has no 'config' object (the model's configuration)")
    try:
        return LMConfig.from_dict(meta["config"])
    except SoljaxError as e:
        raise SoljaxError(f"{meta_path}: {e}") from None


def load_model(directory: Path, dtype: str | None = None, sharding=None):
    """Loads ``(cfg, params, tokenizer)`` from a converted model directory.

    ``dtype`` ("float32" or "bfloat16") overrides the stored parameter dtype (the parameters are
    cast as they are read: no copy in the stored dtype is made); ``sharding`` is passed to
    :func:`soljax.lm.params.abstract_params`.
    """
    directory = Path(directory).expanduser()
    cfg = load_config(directory)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    params = restore_params(directory / "params", abstract_params(cfg, sharding))
    return cfg, params, Tokenizer.from_file(directory / "tokenizer.json")


def params_from_numpy(cfg: LMConfig, tree: dict):
    """Device arrays in the config's dtype from a numpy tree, checking structure and shapes."""
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != jax.tree_util.tree_structure(shapes, is_leaf=is_shape):
        raise SoljaxError("parameter tree does not match the model config")
    for x, shape in zip(leaves, jax.tree_util.tree_leaves(shapes, is_leaf=is_shape)):
        if tuple(x.shape) != tuple(shape):
            raise SoljaxError(f"parameter has shape {tuple(x.shape)}, expected {shape}")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x, dtype=cfg.dtype) for x in leaves])
