"""A converted model directory: ``model.json`` (config), ``tokenizer.json``, ``params/`` (orbax).

Parameters always restore against an abstract tree built from the config (shapes, dtypes and,
when given, shardings), so a model saved on one device layout loads onto any other.
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / "params", params)
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

    ``dtype`` ("float32" or "bfloat16") overrides the stored parameter dtype; ``sharding`` is
    passed to :func:`soljax.lm.params.abstract_params`.
    """
    directory = Path(directory).expanduser()
    cfg = load_config(directory)
    stored = abstract_params(cfg, sharding)
    params = restore_params(directory / "params", stored)
    if dtype is not None and dtype != cfg.dtype:
        cfg = cfg.replace(dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), params)
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
