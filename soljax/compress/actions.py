"""The joint action grid: every (token keep, MLP-input keep, MLP-output bits) combination.

An action is one point of ``keep_fracs x struct_prune_choices x quant_choices``, enumerated with the
token-keep axis outermost and the quantization axis innermost, in the order the values are given::

    idx = i_keep * (P * Q) + i_prune * Q + i_quant

Config spellings:

- ``keep_fracs``: floats in (0, 1], the fraction kappa of the KV cache attention may read.
- ``struct_prune_choices``: ``"s<pct>"`` with an integer keep percentage 1..100 (``"s60"`` keeps 60%
  of the MLP input channels, rho = 0.6).
- ``quant_choices``: ``"q<bits>"`` with 2 <= bits <= 16; ``"q16"`` means no quantization.

Values are stored as float32 exactly as the policy's controls will carry them (kappa 0.1 is the
float32 0.10000000149011612); tags are ``k{kappa%:03d}-s{rho%:03d}-q{bits}``. The grid is hashable
(by its config values), so it may be a static argument of a jitted function.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soljax.errors import SoljaxError

AXES = ("token", "prune", "quant")

_PRUNE_RE = re.compile(r"s(\d+)")
_QUANT_RE = re.compile(r"q(\d+)")


def _as_list(name: str, values) -> list:
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise SoljaxError(f"{name} must be a list, got {values!r}")
    if len(values) == 0:
        raise SoljaxError(f"{name} is empty: give at least one choice")
    return list(values)


def _parse_keep_fracs(values) -> tuple[float, ...]:
    out = []
    for v in _as_list("keep_fracs", values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise SoljaxError(f"keep_fracs: {v!r} is not a number (expected a fraction in (0, 1])")
        f = float(v)
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise SoljaxError(f"keep_fracs: {v!r} is not in (0, 1]")
        out.append(f)
    as_f32 = [float(np.float32(f)) for f in out]
    if len(set(as_f32)) != len(as_f32):
        dup = next(f for f in out if as_f32.count(float(np.float32(f))) > 1)
        raise SoljaxError(f"keep_fracs: duplicate value {dup!r}")
    return tuple(out)


def _parse_choices(name: str, values, pattern: re.Pattern, form: str, lo: int, hi: int,
                   what: str) -> tuple[str, tuple[int, ...]]:
    raw, nums = [], []
    for v in _as_list(name, values):
        if not isinstance(v, str):
            raise SoljaxError(f"{name}: {v!r} is not a string (expected {form})")
        m = pattern.fullmatch(v.strip().lower())
        if m is None:
            raise SoljaxError(f"{name}: malformed choice {v!r} (expected {form})")
        n = int(m.group(1))
        if not lo <= n <= hi:
            raise SoljaxError(f"{name}: {v!r} is out of range ({what} must be in {lo}..{hi})")
        if n in nums:
            raise SoljaxError(f"{name}: duplicate choice {v!r}")
        raw.append(v)
        nums.append(n)
    return tuple(raw), tuple(nums)


@dataclasses.dataclass(frozen=True)
class ActionGrid:
    """The flattened joint action space (A = K * P * Q actions) and its per-action arrays.

    Construct from config values: ``ActionGrid(keep_fracs=[0.1, 1.0], struct_prune_choices=["s60",
    "s100"], quant_choices=["q5", "q16"])``. Invalid values raise :class:`SoljaxError`.

    Attributes (numpy, length A): ``kappa`` (float32 token keep), ``rho`` (float32 MLP-input keep),
    ``bits`` (int32), ``token_cost`` (= kappa), ``prune_cost`` (= rho / rho_max), ``quant_cost``
    (= bits / 16), ``tags``; ``dense_idx``; ``bos_id`` (= A, the "no previous action" id);
    ``num_distinct`` (distinct values per axis, keyed by ``AXES``).
    """

    keep_fracs: tuple[float, ...]
    struct_prune_choices: tuple[str, ...] = ("s100",)
    quant_choices: tuple[str, ...] = ("q16",)

    kappa: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    rho: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    bits: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    tags: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
    dense_idx: int = dataclasses.field(init=False, repr=False, compare=False)
    rho_max: float = dataclasses.field(init=False, repr=False, compare=False)
    token_cost: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    prune_cost: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    quant_cost: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    num_distinct: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        keep = _parse_keep_fracs(self.keep_fracs)
        prune_raw, prune_pct = _parse_choices(
            "struct_prune_choices", self.struct_prune_choices, _PRUNE_RE,
            "s<keep percent>, e.g. 's60'", 1, 100, "the keep percentage")
        quant_raw, quant_bits = _parse_choices(
            "quant_choices", self.quant_choices, _QUANT_RE, "q<bits>, e.g. 'q8'", 2, 16,
            "the bit width")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("keep_fracs", keep)
        set_("struct_prune_choices", prune_raw)
        set_("quant_choices", quant_raw)

        rho_vals = [p / 100.0 for p in prune_pct]
        kk, pp, qq = np.meshgrid(np.arange(len(keep)), np.arange(len(rho_vals)),
                                 np.arange(len(quant_bits)), indexing="ij")
        kk, pp, qq = kk.ravel(), pp.ravel(), qq.ravel()  # keep outer, quant inner
        kappa = np.asarray(keep, np.float32)[kk]
        rho = np.asarray(rho_vals, np.float32)[pp]
        bits = np.asarray(quant_bits, np.int32)[qq]
        tags = tuple(f"k{int(round(keep[a] * 100)):03d}-s{int(round(rho_vals[b] * 100)):03d}-q{quant_bits[c]}"
                     for a, b, c in zip(kk, pp, qq))
        dense = np.flatnonzero((kappa == 1.0) & (rho == 1.0) & (bits == 16))
        if dense.size == 0:
            dense = np.flatnonzero(kappa == 1.0)
        rho_max = float(rho.max())
        for arr in (kappa, rho, bits):
            arr.flags.writeable = False
        set_("kappa", kappa)
        set_("rho", rho)
        set_("bits", bits)
        set_("tags", tags)
        set_("dense_idx", int(dense[0]) if dense.size else 0)
        set_("rho_max", rho_max)
        costs = {"token_cost": kappa.copy(), "prune_cost": (rho / np.float32(rho_max)).astype(np.float32),
                 "quant_cost": (bits.astype(np.float32) / np.float32(16.0))}
        for name, arr in costs.items():
            arr.flags.writeable = False
            set_(name, arr)
        set_("num_distinct", {"token": len(keep), "prune": len(prune_pct), "quant": len(quant_bits)})

    # ------------------------------------------------------------------ sizes and indexing

    @property
    def num_actions(self) -> int:
        """A, the number of composite actions."""
        return int(self.kappa.shape[0])

    def __len__(self) -> int:
        return self.num_actions

    @property
    def bos_id(self) -> int:
        """The "no previous action" id fed to the policy at an episode start (= A)."""
        return self.num_actions

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(K, P, Q)``: choices per axis, in enumeration order."""
        return (len(self.keep_fracs), len(self.struct_prune_choices), len(self.quant_choices))

    def index(self, i_keep: int, i_prune: int, i_quant: int) -> int:
        """Flat action id of per-axis choice indices."""
        _, P, Q = self.shape
        return i_keep * P * Q + i_prune * Q + i_quant

    def unravel(self, idx: int) -> tuple[int, int, int]:
        """Per-axis choice indices ``(i_keep, i_prune, i_quant)`` of a flat action id."""
        _, P, Q = self.shape
        return idx // (P * Q), (idx // Q) % P, idx % Q

    def active_axes(self) -> dict[str, bool]:
        """Whether each axis has more than one choice (a single-choice axis cannot be controlled)."""
        return {axis: n > 1 for axis, n in self.num_distinct.items()}

    def penalty_weights(self, token: float, prune: float, quant: float) -> tuple[float, float, float]:
        """Budget-penalty weights with those of single-choice axes set to 0."""
        active = self.active_axes()
        return tuple(float(w) if active[a] else 0.0 for a, w in zip(AXES, (token, prune, quant)))

    # ------------------------------------------------------------------ jit-side gathers

    def controls(self, action_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Per-row controls ``(kappa f32, rho f32, bits i32)`` of action ids (any shape, in [0, A))."""
        ids = jnp.asarray(action_ids)
        return (jnp.take(jnp.asarray(self.kappa), ids), jnp.take(jnp.asarray(self.rho), ids),
                jnp.take(jnp.asarray(self.bits), ids))

    def usage(self, action_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Nominal per-step usage ``(kappa, rho / rho_max, bits / 16)`` of action ids in [0, A) (float32)."""
        ids = jnp.asarray(action_ids)
        return (jnp.take(jnp.asarray(self.token_cost), ids),
                jnp.take(jnp.asarray(self.prune_cost), ids),
                jnp.take(jnp.asarray(self.quant_cost), ids))
