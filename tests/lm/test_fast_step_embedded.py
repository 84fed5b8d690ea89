"""The fast decode step equals the masked step on the embedded SmolLM2-135M (real weights, real
text): same kept keys per head and layer, logits within 1e-4 of their scale. Skipped without the
embedded model unless ``SOLJAX_REQUIRE_ASSETS=1``.

Every action of the demo run's grid is compared on the model's first 6 layers; the whole 30-layer
model is compared on the unquantized actions. Fake quantization is discontinuous: a float32
summation-order difference that moves an MLP output across a 5-bit rounding boundary changes it by
a whole quantization step, and over 30 layers that happens (k010-s060-q5 at this prompt), after
which both paths are right and differ by more than summation order.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.compress.actions import ActionGrid
from soljax.lm.controlled import Controls, SparsityConfig, SuffixCache, controlled_step, prefill_shared
from soljax.lm.fast_step import FastPath, Levels, fast_step

pytestmark = [pytest.mark.embedded, pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")]

GRID = ActionGrid(keep_fracs=[0.1, 1.0], struct_prune_choices=["s60", "s100"], quant_choices=["q5", "q16"])
SCFG = SparsityConfig(page_size=8)
M, LENGTH, T = 104, 101, 2
TEXT = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took "
        "up any book but the Baronetage; there he found occupation for an idle hour, and consolation in a "
        "distressed one; there his faculties were roused into admiration and respect, by contemplating the "
        "limited remnant of the earliest patents; there any unwelcome sensations, arising from domestic "
        "affairs changed naturally into pity and contempt as he turned over the almost endless creations of "
        "the last century; and there, if every other leaf were powerless, he could read his own history with "
        "an interest which never failed.")


@pytest.mark.parametrize("layers, actions", [(6, range(GRID.num_actions)), (30, (1, 3, 5, 7))])
def test_fast_step_equals_the_masked_step_on_the_embedded_model(embedded_model, layers, actions):
    cfg, params, tok = embedded_model
    assert all(GRID.bits[a] == 16 for a in actions) or layers < cfg.num_layers
    cfg = dataclasses.replace(cfg, num_layers=layers)
    params = {**params, "layers": {k: w[:layers] for k, w in params["layers"].items()}}
    ids = tok.encode(TEXT)
    assert len(ids) >= LENGTH + T
    tokens = jnp.asarray([ids[:LENGTH] + [0] * (M - LENGTH)], jnp.int32)
    path = FastPath(Levels.from_grid(GRID))
    _, prefix = prefill_shared(cfg, SCFG, params, tokens, jnp.array([LENGTH]))
    masked = jax.jit(lambda p, *x: controlled_step(cfg, SCFG, p, *x))
    fast = jax.jit(lambda p, *x: fast_step(cfg, SCFG, path, p, *x))

    def decode(step, a):
        suffix = SuffixCache.empty(cfg, 1, 1, T)
        c = Controls(*(jnp.asarray(v).reshape(1, 1) for v in GRID.controls(a)))
        out = []
        for t in range(T):
            lg, _, suffix, info = step(params, prefix, suffix, jnp.asarray([[ids[LENGTH + t]]]), c)
            out.append((np.asarray(lg), np.asarray(info.kept_keys)))
        return out

    sparse = False
    for a in actions:
        want, got = decode(masked, a), decode(fast, a)
        for (lw, kw), (lg, kg) in zip(want, got):
            np.testing.assert_array_equal(kg, kw)
            np.testing.assert_allclose(lg, lw, rtol=0, atol=1e-4 * np.abs(lw).max())
        sparse |= bool((want[-1][1] < LENGTH + T).any())
    assert sparse
