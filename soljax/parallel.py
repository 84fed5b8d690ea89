"""Scale-out with JAX's own machinery: a device mesh, sharding rules and multi-host start.

soljax trains on one device by default. On several devices (a multi-GPU host, a Cloud TPU slice,
or several hosts joined with :func:`jax.distributed.initialize`) the trainer builds a
:class:`jax.sharding.Mesh` with two axes and runs its compiled steps with explicit input and
output shardings; XLA inserts every collective (no hand-written communication):

* ``data``: the rollout batch. A data batch's ``B`` blocks are split over it (so are the ``B * K``
  rollout rows, the episode buffer, and the per-step tensors that follow from them); each host
  puts only the rows of its own devices onto them (:meth:`MeshPlan.put_batch`).
* ``model``: the frozen LM's weights, for models that do not fit one device. Attention heads
  (``wq``/``wk``/``wv``/``wo`` and their biases), the MLP width (``w_gate``/``w_up``/``w_down``)
  and the vocabulary (``embed``/``lm_head``) are split over it; norms stay replicated. A tensor
  whose split dimension does not divide by the axis size stays replicated (e.g. 2 KV heads on
  a model axis of 4).

The policy, its reference copy, the optimizer state and the gradient accumulator are replicated
(``shard_policy: replicated``) or split over ``data`` along their largest evenly divisible
dimension (``shard_policy: fsdp``, ZeRO-3 style). Sharding never changes results beyond
floating-point summation order.

Config keys: ``mesh_data``/``mesh_model`` (0 = infer: by default ``data`` is the largest divisor of
the device count that divides ``batch_size`` and the remaining devices form ``model``, so any batch
size runs on any device count; see :func:`mesh_shape`), ``shard_policy``,
and for several processes ``distributed`` (auto | on | off), ``coordinator_address``,
``num_processes``, ``process_id``, each falling back to ``SOLJAX_COORDINATOR_ADDRESS`` (or JAX's
own ``JAX_COORDINATOR_ADDRESS``), ``SOLJAX_NUM_PROCESSES`` and ``SOLJAX_PROCESS_ID``. See
``docs/scaleout.md``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from soljax.errors import SoljaxError

DATA, MODEL = "data", "model"

# Which dimension of each LM parameter goes over the ``model`` axis (layer-stacked layouts, see
# soljax.lm.params): heads for attention, the MLP width, the vocabulary for embeddings.
LM_MODEL_DIM = {
    "wq": 2, "wk": 2, "wv": 2,  # [L, D, H, Dh]
    "bq": 1, "bk": 1, "bv": 1,  # [L, H, Dh]
    "wo": 1,  # [L, Hq, Dh, D]
    "w_gate": 2, "w_up": 2,  # [L, D, F]
    "w_down": 1,  # [L, F, D]
    "embed": 0,  # [V, D]
    "lm_head": 1,  # [D, V]
}

# Parts of the trainer's state pytree (soljax.train.trainer.Trainer.init_state) and how they are laid out.
POLICY_PARTS = ("policy", "ref", "opt", "grad_acc")
ROW_PARTS = ("buffer",)


# ----------------------------------------------------------------------------------------------
# Multi-host start


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise SoljaxError(f"environment variable {name} must be an integer, got {value!r}") from None


def distributed_settings(cfg) -> dict[str, Any]:
    """``coordinator_address``, ``num_processes``, ``process_id`` from the config, else the
    environment (``SOLJAX_*``, then ``JAX_COORDINATOR_ADDRESS``); None where neither says."""
    address = (cfg.coordinator_address or os.environ.get("SOLJAX_COORDINATOR_ADDRESS")
               or os.environ.get("JAX_COORDINATOR_ADDRESS") or None)
    num = cfg.num_processes if cfg.num_processes is not None else _env_int("SOLJAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("SOLJAX_PROCESS_ID")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def initialize_distributed(cfg) -> bool:
    """Joins a multi-process JAX run when the config (or environment) asks for one.

    ``distributed: on`` always calls :func:`jax.distributed.initialize`; unset settings are left
    to JAX, which detects Cloud TPU slices, SLURM and other clusters by itself. ``auto`` (the
    default) calls it only when a coordinator address or ``num_processes > 1`` is known; ``off``
    never does. Must run before JAX touches a device; a second call is a no-op. On CPU the
    cross-process collectives use gloo. Returns whether this process is part of a multi-process run.
    """
    if jax.distributed.is_initialized():
        return True
    settings = distributed_settings(cfg)
    wanted = cfg.distributed == "on" or (cfg.distributed == "auto" and (
        settings["coordinator_address"] is not None or (settings["num_processes"] or 1) > 1))
    if not wanted:
        return False
    num, pid = settings["num_processes"], settings["process_id"]
    if num is not None and pid is not None and not 0 <= pid < num:
        raise SoljaxError(f"process_id {pid} is out of range for num_processes {num}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings)
    except (RuntimeError, ValueError) as e:
        raise SoljaxError(f"cannot start the multi-process run ({settings}): "
                          f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}") from None
    return True


def is_primary() -> bool:
    """True on the process that writes logs, metrics and plots (process 0)."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------
# The mesh


def _largest_divisor(n: int, batch_size: int | None) -> int:
    """The largest divisor of ``n`` that also divides ``batch_size`` (``n`` itself when None)."""
    if batch_size is None:
        return n
    return max(d for d in range(1, n + 1) if n % d == 0 and batch_size % d == 0)


def mesh_shape(mesh_data: int, mesh_model: int, num_devices: int, batch_size: int | None = None) -> tuple[int, int]:
    """``(data, model)`` axis sizes for ``num_devices`` devices; 0 means "infer".

    * both 0: ``data`` is the largest divisor of the device count that also divides ``batch_size``
      (the blocks of a batch are split over ``data``), every remaining device goes on ``model``
      (``data x model`` = all devices: 8 devices, batch 4 -> 4 x 2; batch 2 -> 2 x 4);
    * ``mesh_data`` 0, ``mesh_model`` m: m must divide the device count; ``data`` is the largest
      divisor of ``num_devices / m`` that divides ``batch_size`` (``mesh_model=1``: data parallel only,
      on as many devices as the batch can use);
    * ``mesh_model`` 0, ``mesh_data`` d: d must divide the device count; ``model`` takes the rest;
    * both given: their product may be at most the device count (the first devices are used).

    ``batch_size`` None: no batch constraint. Impossible values raise one :class:`SoljaxError` line.
    """
    for name, v in (("mesh_data", mesh_data), ("mesh_model", mesh_model)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SoljaxError(f"config: {name} must be a non-negative integer (0 = infer), got {v!r}")
    if mesh_data == 0 or mesh_model == 0:
        given, name = (mesh_model, "mesh_model") if mesh_data == 0 else (mesh_data, "mesh_data")
        if given and num_devices % given:
            raise SoljaxError(f"{name}={given} does not divide the {num_devices} devices: choose a divisor "
                              f"of {num_devices} or give both mesh_data and mesh_model")
        if mesh_data:
            return mesh_data, num_devices // mesh_data
        data = _largest_divisor(num_devices // (mesh_model or 1), batch_size)
        return data, mesh_model or num_devices // data
    if mesh_data * mesh_model > num_devices:
        raise SoljaxError(f"mesh_data x mesh_model = {mesh_data} x {mesh_model} = {mesh_data * mesh_model} needs "
                          f"more than the {num_devices} devices available")
    return mesh_data, mesh_model


def make_mesh(cfg, devices: list | None = None) -> Mesh | None:
    """The ``(data, model)`` mesh for ``cfg`` over ``devices`` (default: all devices of all
    processes), or None when it has a single device (the plain single-device path)."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = mesh_shape(cfg.mesh_data, cfg.mesh_model, len(devices), cfg.batch_size)
    if data * model == 1 and jax.process_count() == 1:
        return None
    if jax.process_count() > 1 and data * model != len(devices):
        raise SoljaxError(f"a multi-process run must use every device: mesh {data} x {model} covers "
                          f"{data * model} of {len(devices)}")
    if cfg.batch_size % data:
        raise SoljaxError(f"batch_size {cfg.batch_size} does not divide over mesh_data={data}: use a multiple "
                          f"of {data} blocks per batch (or a smaller mesh_data)")
    try:
        return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                             devices=devices[:data * model])
    except ValueError as e:
        raise SoljaxError(f"cannot lay out a {data} x {model} mesh on these devices: {e}") from None


# ----------------------------------------------------------------------------------------------
# Sharding rules


def _leaf_name(path) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "key", getattr(last, "name", last)))


def lm_param_spec(name: str, shape: tuple[int, ...], model_size: int) -> P:
    """PartitionSpec of the LM parameter ``name`` (see :data:`LM_MODEL_DIM`): its model-parallel
    dimension over ``model`` when that divides evenly, otherwise replicated."""
    dim = LM_MODEL_DIM.get(name)
    if model_size == 1 or dim is None or dim >= len(shape) or shape[dim] % model_size:
        return P()
    return P(*([None] * dim + [MODEL]))


def fsdp_spec(shape: tuple[int, ...], data_size: int) -> P:
    """Splits the largest dimension that ``data_size`` divides over ``data`` (replicated if none)."""
    if data_size == 1:
        return P()
    dims = sorted((d for d in range(len(shape)) if shape[d] >= data_size and shape[d] % data_size == 0),
                  key=lambda d: (-shape[d], d))
    if not dims:
        return P()
    return P(*([None] * dims[0] + [DATA]))


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """A mesh plus soljax's layout rules for the LM, the trainer state and the data batches."""

    mesh: Mesh
    shard_policy: str = "replicated"

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL]

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.named(P())

    @property
    def blocks(self) -> NamedSharding:
        """Token blocks ``[B, M + T + 1]``: blocks over ``data``."""
        return self.named(P(DATA))

    # ------------------------------------------------------------------ LM

    def lm_sharding(self, path, shape) -> NamedSharding:
        """``(key path, shape) -> sharding``, the form :func:`soljax.lm.load_model` takes."""
        return self.named(lm_param_spec(_leaf_name(path), tuple(shape), self.model_size))

    def lm_shardings(self, params: dict) -> dict:
        return jax.tree_util.tree_map_with_path(lambda p, x: self.lm_sharding(p, np.shape(x)), params)

    # ------------------------------------------------------------------ trainer state

    def state_shardings(self, abstract_state: dict) -> dict:
        """Shardings for the trainer's state dict: policy parts by ``shard_policy``, the episode
        buffer's rows over ``data``, counters and the RNG key replicated."""

        def part(name: str, tree):
            if name in POLICY_PARTS and self.shard_policy == "fsdp":
                return jax.tree.map(lambda a: self.named(fsdp_spec(a.shape, self.data_size)), tree)
            if name in ROW_PARTS:
                return jax.tree.map(lambda a: self.named(P(DATA) if a.shape[0] % self.data_size == 0 else P()),
                                    tree)
            return jax.tree.map(lambda a: self.replicated, tree)

        return {name: part(name, tree) for name, tree in abstract_state.items()}

    # ------------------------------------------------------------------ putting data on devices

    def put_batch(self, blocks_bn: np.ndarray) -> jax.Array:
        """The global ``[B, N]`` batch array; each process reads only the rows of its devices."""
        blocks_bn = np.asarray(blocks_bn)
        return jax.make_array_from_callback(blocks_bn.shape, self.blocks, lambda idx: blocks_bn[idx])


def place(tree, shardings):
    """Puts a pytree of host-side values (identical on every process) onto ``shardings``: each
    process transfers only the slices its own devices hold."""

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def with_shardings(abstract, shardings):
    """``jax.ShapeDtypeStruct`` tree of ``abstract`` carrying ``shardings`` (a restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def gather(tree):
    """Host numpy copies of a pytree of (possibly multi-process, sharded) arrays, on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def plan_from_config(cfg, devices: list | None = None) -> MeshPlan | None:
    """The :class:`MeshPlan` for ``cfg`` (None on the single-device path)."""
    mesh = make_mesh(cfg, devices)
    return None if mesh is None else MeshPlan(mesh=mesh, shard_policy=cfg.shard_policy)


def serving_plan(devices: list | None = None) -> MeshPlan | None:
    """The mesh evaluation, generation and scoring put the frozen LM on: this process's devices
    (default :func:`jax.local_devices`) as a ``data`` x ``model`` mesh of 1 x n, so the LM's weights
    are split over ``model`` by the training rules (:func:`lm_param_spec`: heads, MLP width and
    vocabulary; a tensor that does not divide stays replicated) and each device holds about 1/n of
    them. Inputs and small state (a policy, targets, schedules) stay replicated; XLA partitions
    the computation. None on one device: the plain single-device path, results unchanged."""
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) == 1:
        return None
    data, model = mesh_shape(1, 0, len(devices))
    mesh = jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)
    return MeshPlan(mesh=mesh)


def serving_lm_sharding(devices: list | None = None):
    """``(path, shape) -> sharding`` for loading the LM onto :func:`serving_plan` (the form
    :func:`soljax.lm.load_model` takes), or None on one device."""
    plan = serving_plan(devices)
    return None if plan is None else plan.lm_sharding


def replicate_on(tree, params):
    """``tree`` (small state such as a policy's variables) replicated on the mesh that ``params``
    (the LM's arrays) live on, so both can enter one compiled call; ``tree`` unchanged when
    ``params`` sit on one device."""
    sharding = next((x.sharding for x in jax.tree.leaves(params) if isinstance(x, jax.Array)), None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return tree
    rep = NamedSharding(sharding.mesh, P())
    return place(tree, jax.tree.map(lambda _: rep, tree))


def describe(plan: MeshPlan | None) -> str:
    """One line for logs: the mesh and where this process sits in it."""
    if plan is None:
        return f"1 device ({jax.devices()[0].platform})"
    return (f"mesh data={plan.data_size} x model={plan.model_size} over {plan.mesh.devices.size} "
            f"{plan.mesh.devices.flat[0].platform} devices, process {jax.process_index()} of "
            f"{jax.process_count()}, policy {plan.shard_policy}")

