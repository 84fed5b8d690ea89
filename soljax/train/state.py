"""The trainer's whole state as one pytree: policy, optimizer, gradient accumulator, episode buffer,
counters and the RNG key. Checkpoints store it as a plain nested dict (:meth:`TrainState.to_tree`),
so a checkpoint's layout does not depend on these classes."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Buffer:
    """Episodes collected since the last update, one row per (block, schedule), ``[rows, T, ...]``:
    the policy's inputs (``h_prev``, ``tokens``, ``scalars``, ``prev_action``, ``targets [rows, 3]``),
    the ``actions`` taken, their log-probability when sampled (``logp_old``) and the advantages."""

    h_prev: jax.Array
    tokens: jax.Array
    scalars: jax.Array
    prev_action: jax.Array
    actions: jax.Array
    logp_old: jax.Array
    adv: jax.Array
    targets: jax.Array

    @classmethod
    def zeros(cls, rows: int, T: int, D: int, num_scalars: int) -> "Buffer":
        f32, i32 = jnp.float32, jnp.int32
        return cls(h_prev=jnp.zeros((rows, T, D), f32), tokens=jnp.zeros((rows, T), i32),
                   scalars=jnp.zeros((rows, T, num_scalars), f32), prev_action=jnp.zeros((rows, T), i32),
                   actions=jnp.zeros((rows, T), i32), logp_old=jnp.zeros((rows, T), f32),
                   adv=jnp.zeros((rows, T), f32), targets=jnp.zeros((rows, 3), f32))

    def write(self, rows: "Buffer", at: jax.Array) -> "Buffer":
        """This buffer with ``rows`` written from row ``at`` on."""
        return jax.tree.map(lambda a, n: jax.lax.dynamic_update_slice_in_dim(a, n, at, axis=0), self, rows)

    def take(self, index: jax.Array) -> "Buffer":
        """The rows ``index``."""
        return jax.tree.map(lambda a: jnp.take(a, index, axis=0), self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """``policy``/``ref`` (reference policy for the KL penalty, ``{}`` when unused) variables,
    optimizer state ``opt``, the gradient accumulator ``grad_acc`` and its minibatch count ``accum``,
    the episode ``buffer`` and its ``fill`` (rows written), the data ``batch`` position, the optimizer
    ``updates`` done and the RNG ``key``."""

    policy: Any
    ref: Any
    opt: Any
    grad_acc: Any
    accum: jax.Array
    buffer: Buffer
    fill: jax.Array
    batch: jax.Array
    updates: jax.Array
    key: jax.Array

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)

    def to_tree(self) -> dict:
        """The checkpoint layout: a nested dict of the same leaves."""
        tree = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        tree["buffer"] = {f.name: getattr(self.buffer, f.name) for f in dataclasses.fields(Buffer)}
        return tree

    @classmethod
    def from_tree(cls, tree: dict) -> "TrainState":
        return cls(**dict(tree, buffer=Buffer(**tree["buffer"])))
