"""Budget-matched fixed and random schedules hit their targets."""

import numpy as np
import pytest

from soljax.control import axis_levels, bracket, fixed_schedule, random_schedule
from soljax.compress.actions import ActionGrid

GRID = ActionGrid(keep_fracs=(0.1, 0.6, 1.0), struct_prune_choices=("s40", "s80", "s100"),
                  quant_choices=("q5", "q7", "q16"))
T = 16


def _usage(ids):
    return np.stack([GRID.token_cost[ids], GRID.prune_cost[ids], GRID.quant_cost[ids]], -1).mean(-2)


def test_levels_and_bracket():
    keep, prune, quant = axis_levels(GRID)
    np.testing.assert_allclose(keep, [0.1, 0.6, 1.0], rtol=1e-6)
    np.testing.assert_allclose(prune, [0.4, 0.8, 1.0], rtol=1e-6)
    np.testing.assert_allclose(quant, [5 / 16, 7 / 16, 1.0])
    lo, hi, p = bracket(keep, np.array([0.1, 0.35, 0.6, 0.9, 1.0, 0.05, 1.2]))
    assert lo.tolist() == [0, 0, 1, 1, 2, 0, 2] and hi.tolist() == [0, 1, 1, 2, 2, 0, 2]
    np.testing.assert_allclose(p, [0, 0.5, 0, 0.75, 0, 0, 0], atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_fixed_hits_the_average_within_one_grid_step_per_sequence(seed):
    targets = np.random.default_rng(seed).uniform([0.1, 0.4, 0.3125], [1.0, 1.0, 1.0], (32, 3))
    ids = fixed_schedule(GRID, targets, T, schedules=2)
    assert ids.shape == (32, 2, T) and ids.min() >= 0 and ids.max() < GRID.num_actions
    gap = np.abs(_usage(ids) - targets[:, None, :])
    step = np.array([0.5, 0.4, 9 / 16])  # the largest gap between neighbouring levels per axis
    assert (gap <= step / T + 1e-6).all()
    # uniform over time: the first and second halves spend within one level of each other
    halves = [_usage(ids[:, :, :8]), _usage(ids[:, :, 8:])]
    assert (np.abs(halves[0] - halves[1]) <= step * 2 / T + 1e-6).all()


def test_random_hits_the_average_exactly_when_the_target_is_reachable():
    rng = np.random.default_rng(0)
    keep, prune, quant = axis_levels(GRID)
    # targets on the 1/T lattice between bracketing levels are hit exactly
    targets = np.array([[0.1 + 0.5 * 5 / T, 0.8 + 0.2 * 3 / T, 5 / 16 + (2 / 16) * 7 / T]])
    ids = random_schedule(GRID, targets, T, 50, rng)
    np.testing.assert_allclose(_usage(ids)[0], np.broadcast_to(targets, (50, 3)), atol=1e-6)
    assert len({tuple(r) for r in ids[0]}) > 40  # different orders
    ids2 = random_schedule(GRID, targets, T, 50, np.random.default_rng(0))
    np.testing.assert_array_equal(ids, ids2)  # seeded
