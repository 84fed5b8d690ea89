"""What a controller sees before each step, what it must answer, and the engine's usage accounting.

The engine (:mod:`soljax.engine.step`) builds an :class:`Observation` per step and row, asks the
:class:`Controller` for controls, runs the controlled LM step and adds the *applied* nominal usage
(kappa, rho / rho_max, bits / 16; dense on non-effective steps) to the running sums it carries. The
running sums are part of the observation, so controllers that track a budget read the spent usage
from it instead of recomputing it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from soljax.lm.controlled import Controls

NUM_SCALARS = 8


class Observation(NamedTuple):
    """What a controller sees before step t, per row ``[B, K, ...]``.

    ``h_prev``: LM final-norm hidden state of the previous position (after the prefill at t=0);
    ``tokens``/``tok_emb``: the token about to be processed and its LM input embedding;
    ``scalars [B, K, 8]``: ``(t+1)/T, effective, C_tok, C_pru, C_q, dev_tok, dev_pru, dev_q`` with
    ``dev`` the running mean usage over earlier effective steps minus the target (0 before any);
    ``prev_action``: the previous action id (the controller's BOS id at t=0); ``t``: step index;
    ``steps_left``: the effective steps from this one to the end of the episode, this one included
    (what a controller can still spend its budget on); ``usage_sum [B, K, 3]`` and ``eff_count
    [B, K]``: the applied usage summed over the earlier effective steps, and their number (the
    budget spent so far).
    Only for controllers with ``needs_lm_signals = True`` (else None): ``lm_entropy`` and
    ``lm_margin [B, K]``, the normalized entropy ``H(p) / log V`` and top-1 minus top-2
    probability of the LM distribution that predicted the current token (the previous step's, or
    the prefill's at t=0), and ``prev_tok_emb``, the embedding of the previous input token.
    """

    h_prev: jax.Array
    tokens: jax.Array
    tok_emb: jax.Array
    scalars: jax.Array
    prev_action: jax.Array
    t: jax.Array
    steps_left: jax.Array
    usage_sum: jax.Array
    eff_count: jax.Array
    lm_entropy: jax.Array | None = None
    lm_margin: jax.Array | None = None
    prev_tok_emb: jax.Array | None = None


@runtime_checkable
class Controller(Protocol):
    """Who chooses each step's compute. A controller is a hashable (static) object; its arrays
    travel separately as ``ctrl_params``, so one compiled program serves any values.

    ``bos_id``: the previous action fed at t=0; ``dense_id``: the action fed back on non-effective
    steps; ``rho_max``: the largest MLP keep fraction (usage normalization); ``needs_lm_signals``:
    whether observations must carry the LM entropy/margin and the previous token's embedding.
    """

    bos_id: int
    dense_id: int
    rho_max: float
    needs_lm_signals: bool

    def init(self, ctrl_params: Any, B: int, K: int, T: int) -> Any:
        """The controller's state at the start of an episode (a pytree carried through the scan)."""

    def act(self, ctrl_params: Any, state: Any, obs: Observation, targets_b3: jax.Array,
            key: jax.Array) -> tuple[Controls, jax.Array, jax.Array, Any]:
        """``(controls [B, K], actions [B, K] int32, logp of the actions [B, K], new state)``."""


def steps_left(effective_tb: np.ndarray | jax.Array) -> jax.Array:
    """Per step, the effective steps from it to the end: reverse cumulative sum over axis 0."""
    eff = jnp.asarray(effective_tb, jnp.int32)
    return jnp.flip(jnp.cumsum(jnp.flip(eff, 0), 0), 0)


def step_scalars(t, T: int, effective, targets, usage_sum, eff_count):
    """The 8 policy scalars ``[B, K, 8]`` for step t (see :class:`Observation`)."""
    B, K = effective.shape
    tgt = jnp.broadcast_to(targets[:, None, :], (B, K, 3))
    mean = jnp.where(eff_count[..., None] > 0, usage_sum / jnp.maximum(eff_count, 1)[..., None], tgt)
    frac = jnp.full((B, K, 1), (t + 1) / T, jnp.float32)
    return jnp.concatenate([frac, effective[..., None].astype(jnp.float32), tgt, mean - tgt], axis=-1)


def usage_per_step(controls: Controls, rho_max: float) -> jax.Array:
    """``[..., 3]`` nominal usage (kappa, rho / rho_max, bits / 16) of controls ``[...]``."""
    return jnp.stack([controls.kappa.astype(jnp.float32), controls.rho.astype(jnp.float32) / rho_max,
                      controls.bits.astype(jnp.float32) / 16.0], axis=-1)


def applied_usage(controls: Controls, effective: jax.Array, rho_max: float) -> jax.Array:
    """``[..., 3]`` nominal usage of the controls a step actually applied: the chosen ones on
    effective steps, dense elsewhere."""
    applied = Controls(kappa=jnp.where(effective, controls.kappa, 1.0), rho=jnp.where(effective, controls.rho, 1.0),
                       bits=jnp.where(effective, controls.bits, 16))
    return usage_per_step(applied, rho_max)


def episode_usage(usage: jax.Array, effective: jax.Array) -> jax.Array:
    """Mean of ``usage [..., T, 3]`` over effective steps -> ``[..., 3]``."""
    eff = effective.astype(jnp.float32)[..., None]
    return (usage * eff).sum(-2) / jnp.maximum(eff.sum(-2), 1.0)


def lm_signals(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalized entropy and top-1 minus top-2 probability of next-token ``logits [..., V]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -(jnp.exp(logp) * logp).sum(-1) / jnp.log(logits.shape[-1])
    top2 = jnp.exp(jax.lax.top_k(logp, 2)[0])
    return entropy, top2[..., 0] - top2[..., 1]
