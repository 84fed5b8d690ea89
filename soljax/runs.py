"""A training run on disk, read in one place.

::

    <run>/config.yaml        the run's full TrainConfig
    <run>/checkpoints/<n>/   orbax checkpoints of the whole training state (n = data batches)
    <run>/metrics.jsonl      one JSON object per data batch
    <run>/tb/                TensorBoard event files
    <run>/training.png       reward, penalty and budget adherence curves

The trainer writes runs (:mod:`soljax.train.writer`); everything that uses one (evaluation,
serving, the demo, notebooks) reads it through these functions: its config, its checkpoints, its
policy, its LM, and the controlled model made of them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from soljax import parallel
from soljax.config import TrainConfig, action_grid, policy_config, sparsity_config
from soljax.control import GivenActions, GivenControls, PolicyController, constant_controls, fixed_schedule
from soljax.engine import ControlledModel
from soljax.errors import SoljaxError
from soljax.lm.fast_step import FastPath, Levels

CONTROLLERS = ("policy", "fixed", "dense")


def run_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`~soljax.config.TrainConfig` saved in a training run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SoljaxError(f"no such training run directory: {run_dir}")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise SoljaxError(f"{run_dir} is not a soljax training run (no config.yaml)")
    return TrainConfig.from_dict(yaml.safe_load(saved.read_text()) or {})


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (a torn last line, from a run killed while writing it
    or still writing it, is left out)."""
    lines = Path(path).read_text().split("\n")
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: not completely written
                break
            raise SoljaxError(f"{path} line {i + 1} is not valid JSON") from None
    return rows


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The data batches at which a training run has (finished) checkpoints, ascending."""
    import orbax.checkpoint as ocp

    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    mgr = ocp.CheckpointManager(ckpts.absolute())
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


def load_checkpoint(run_dir: str | Path, step: int | None = None) -> dict:
    """The whole training state saved at checkpoint ``step`` (default: the latest) of a training
    run, as the nested dict of arrays the trainer checkpoints (see
    :meth:`soljax.train.state.TrainState.to_tree`), on this process's first device whatever mesh
    saved it."""
    import jax
    import orbax.checkpoint as ocp

    ckpts = Path(run_dir) / "checkpoints"
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise SoljaxError(f"{run_dir} holds no checkpoint yet")
    step = max(steps) if step is None else step
    if step not in steps:
        raise SoljaxError(f"{run_dir} has no checkpoint {step} (has {steps})")
    mgr = ocp.CheckpointManager(ckpts.absolute(), item_handlers=ocp.StandardCheckpointHandler())
    try:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        stored = mgr.item_metadata(step).tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
        return mgr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:
        raise SoljaxError(f"cannot restore {ckpts / str(step)}: "
                          f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    finally:
        mgr.close()


def load_policy(run_dir: str | Path, step: int | None = None) -> tuple[TrainConfig, dict]:
    """A training run's config and its policy variables (for ``SOLPolicy.apply``) at checkpoint
    ``step`` (default: the latest), on this process's first device whatever mesh saved them."""
    cfg = run_config(run_dir)
    return cfg, load_checkpoint(run_dir, step)["policy"]


def model_directory(name: str | Path, dtype: str = "float32") -> Path:
    """The soljax model directory of a model name: ``embedded`` (fetched and converted on first
    use), a soljax model directory, a Hugging Face model directory or ``.gguf`` file, or a Hugging
    Face id ``org/name[@revision]`` from the local Hugging Face cache or downloaded; anything but a
    soljax model directory is converted in ``dtype`` once into the soljax cache and reused (see
    :mod:`soljax.lm.hub`)."""
    from soljax.data.assets import cache_dir
    from soljax.lm.hub import resolve_model

    if str(name) == "embedded":
        from soljax.data.embedded import ensure_embedded_model

        return ensure_embedded_model()
    return resolve_model(name, dtype=dtype, models_dir=cache_dir() / "models",
                         say=lambda msg: print(f"soljax: {msg}", file=sys.stderr, flush=True))


def load_lm(cfg: TrainConfig, sharding=None, *, model_dir: str | Path | None = None,
            dtype: str | None = None) -> tuple:
    """The frozen LM of a run (``cfg.model``, or ``model_dir``: any model name
    :func:`model_directory` takes) as ``(LMConfig, params, tokenizer)`` in ``dtype`` (default the
    run's); ``sharding``: ``(path, shape) -> sharding`` to restore the parameters straight onto a
    mesh (each host reads only its own shards)."""
    from soljax.lm.checkpoint import load_model

    dtype = dtype or cfg.dtype
    model = model_directory(cfg.model if model_dir is None else model_dir, dtype)
    return load_model(model, dtype=dtype, sharding=sharding)


def load_lm_sharded(cfg: TrainConfig, *, model_dir: str | Path | None = None, dtype: str | None = None) -> tuple:
    """:func:`load_lm` onto every local device, the way evaluation and generation use the LM: its
    weights restored straight onto :func:`soljax.parallel.serving_plan`'s mesh (split over the
    ``model`` axis by the training rules), so a model too large for one device still loads. On one
    device it is exactly :func:`load_lm`."""
    return load_lm(cfg, parallel.serving_lm_sharding(), model_dir=model_dir, dtype=dtype)


def controlled_model(cfg, params, run_dir: str | Path, *, step: int | None = None, controller: str = "policy",
                     greedy: bool = True, guard: bool = False, fast: bool = True, replay: bool = True,
                     impl: str | None = None) -> ControlledModel:
    """The controlled model of a training run on an already loaded LM (``cfg``, ``params``), with
    the run's sparsity settings and horizon: its policy (``controller="policy"``, greedy or sampled
    actions; ``guard``: the targets are hard caps, see :class:`~soljax.control.PolicyController`),
    the budget-matched fixed schedule over its action grid (``"fixed"``) or the dense model
    (``"dense"``). ``fast``: decode single prompts and small batches on the fast path (static branches per
    level of the run's grid, :mod:`soljax.lm.fast_step`), which computes the same as the masked step.
    ``replay``: replay each finished episode densely (the reference's KV refresh; False keeps the
    episode's compressed K/V entries, see :func:`soljax.engine.episodes.run_episode`).
    ``impl``: overrides the run's ``attention_impl`` and ``mlp_impl`` (xla | pallas | cpu: the C++
    kernels)."""
    if controller not in CONTROLLERS:
        raise SoljaxError(f"unknown controller {controller!r} for a training run (expected one of "
                          f"{', '.join(CONTROLLERS)})")
    if guard and controller != "policy":
        raise SoljaxError("the budget guard applies to the policy controller only")
    tcfg = run_config(run_dir)
    grid, T, scfg = action_grid(tcfg), tcfg.rollout_len, sparsity_config(tcfg)
    if impl is not None:
        scfg = dataclasses.replace(scfg, attention_impl=impl, mlp_impl=impl)
    path = None
    if fast:
        path = FastPath(Levels.of() if controller == "dense" else Levels.from_grid(grid),
                        mlp="masked" if scfg.mlp_impl == "xla" else scfg.mlp_impl,
                        attention_impl=scfg.attention_impl, interpret=scfg.kernel_interpret)
    if controller == "dense":  # every row at full usage, whatever its targets
        dense = constant_controls(T)
        return ControlledModel(cfg, params, scfg, GivenControls(), lambda targets: dense(np.ones_like(targets)), T,
                               fast=path, replay=replay)
    if controller == "fixed":
        return ControlledModel(cfg, params, scfg, GivenActions(grid=grid),
                               lambda targets: jnp.asarray(fixed_schedule(grid, targets, T)), T, fast=path,
                               replay=replay)
    _, variables = load_policy(run_dir, step)
    pcfg = policy_config(tcfg)
    want = 2 * cfg.hidden_size + pcfg.scalar_hidden + pcfg.action_dim
    got = variables["params"]["in_proj"]["kernel"].shape[0]
    if got != want:
        raise SoljaxError(f"the policy in {run_dir} was trained on an LM of another width (input size "
                          f"{got}, this LM needs {want}): use the run's model")
    policy = PolicyController(grid=grid, policy=pcfg, greedy=greedy, guard=guard)
    return ControlledModel(cfg, params, scfg, policy, parallel.replicate_on(variables, params), T, fast=path,
                           replay=replay)


def load_controlled(run_dir: str | Path, *, model_dir: str | Path | None = None, dtype: str | None = None,
                    step: int | None = None, controller: str = "policy", greedy: bool = True, guard: bool = False,
                    fast: bool = True, replay: bool = True, impl: str | None = None):
    """``(ControlledModel, tokenizer)`` of a training run: its LM (``model_dir``, default the run's
    own model, on every local device: see :func:`load_lm_sharded`) and its policy, fixed baseline or
    dense model (see :func:`controlled_model`, also for ``impl``)."""
    cfg, params, tok = load_lm_sharded(run_config(run_dir), model_dir=model_dir, dtype=dtype)
    return controlled_model(cfg, params, run_dir, step=step, controller=controller, greedy=greedy,
                            guard=guard, fast=fast, replay=replay, impl=impl), tok
