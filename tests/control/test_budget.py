"""The budget guard's feasibility tests: the episode-level and the running (every-step) form, and the
targets a guard cannot cap."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from soljax.compress.actions import ActionGrid
from soljax.control import PolicyController, axis_levels
from soljax.control.budget import check_guard_targets, within_budget, within_running_budget
from soljax.control.network import PolicyConfig
from soljax.errors import SoljaxError

GRID = ActionGrid(keep_fracs=(0.1, 1.0), struct_prune_choices=("s60", "s100"), quant_choices=("q5", "q16"))
TOKEN_ONLY = ActionGrid(keep_fracs=(0.1, 0.5, 1.0))


def test_running_budget_never_lets_a_step_spend_what_was_not_saved():
    tgt = jnp.array([0.3, 1.0, 1.0])
    # first step: 0.3 is all there is, so only keep 0.1 (the episode form would allow 0.5 and 1.0)
    assert np.asarray(within_running_budget(TOKEN_ONLY, tgt, jnp.zeros(3), jnp.zeros(()))).tolist() == [
        True, False, False]
    assert np.asarray(within_budget(TOKEN_ONLY, tgt, jnp.zeros(3), jnp.zeros(()), 4)).tolist() == [True, True, False]
    # two cheap steps saved 0.4: 0.3 * 3 - 0.2 = 0.7 is left, so keep 0.5 is allowed, 1.0 not
    ok = within_running_budget(TOKEN_ONLY, tgt, jnp.array([0.2, 2.0, 2.0]), jnp.full((), 2.0))
    assert np.asarray(ok).tolist() == [True, True, False]
    # overspent (or a target below the grid): the cheapest level stays allowed
    ok = within_running_budget(TOKEN_ONLY, jnp.array([0.05, 1.0, 1.0]), jnp.array([0.5, 5.0, 5.0]), jnp.full((), 5.0))
    assert np.asarray(ok).tolist() == [True, False, False]


def test_following_the_running_budget_keeps_every_prefix_mean_within_the_target():
    rng = np.random.default_rng(0)
    costs = np.stack([GRID.token_cost, GRID.prune_cost, GRID.quant_cost], -1)
    tgt = np.array([0.45, 0.8, 0.5])
    usage, n = np.zeros(3), 0
    for _ in range(200):  # a spender: the costliest allowed action, ties broken at random
        ok = np.asarray(within_running_budget(GRID, jnp.asarray(tgt), jnp.asarray(usage), jnp.asarray(float(n))))
        a = int(np.argmax(np.where(ok, costs.sum(-1) + 0.01 * rng.random(GRID.num_actions), -1)))
        usage, n = usage + costs[a], n + 1
        assert (usage / n <= tgt + 1e-5).all(), (n, usage / n)
    assert (usage / n > tgt - 0.02).all()  # and it can spend up to them


def test_targets_below_the_grid_are_refused_by_the_guard_only():
    floors = [float(lv.min()) for lv in axis_levels(GRID)]
    assert floors == pytest.approx([0.1, 0.6, 0.3125])
    check_guard_targets(GRID, np.float32(floors))  # the floor itself can be capped
    check_guard_targets(GRID, [[0.5, 0.8, 0.5], [0.1, 0.6, 0.3125]])
    with pytest.raises(SoljaxError, match=r"token keep 0\.05 is below the grid's cheapest level 0\.1 "):
        check_guard_targets(GRID, [[0.5, 0.8, 0.5], [0.05, 0.8, 0.5]])
    with pytest.raises(SoljaxError, match=r"prune keep 0\.5 is below .* 0\.6; quant ratio 0\.25 \(4 bits\) is "
                                          r"below the grid's cheapest level 0\.3125 \(5 bits\)"):
        check_guard_targets(GRID, (0.5, 0.5, 0.25))
    pcfg = PolicyConfig(d_model=32, n_heads=2, max_len=8)
    with pytest.raises(SoljaxError, match="token keep 0.05"):
        PolicyController(grid=GRID, policy=pcfg, guard=True).check_targets((0.05, 0.8, 0.5))
    PolicyController(grid=GRID, policy=pcfg).check_targets((0.05, 0.8, 0.5))  # unguarded: a request


def test_open_ended_policy_guards_every_step_and_leaves_an_unguarded_one_alone():
    pcfg = PolicyConfig(d_model=32, n_heads=2, max_len=8)
    free = PolicyController(grid=GRID, policy=pcfg)
    assert free.open_ended() == free
    guarded = PolicyController(grid=GRID, policy=pcfg, guard=True)
    assert guarded.open_ended() == dataclasses.replace(guarded, guard_every_step=True) != guarded
    with pytest.raises(SoljaxError, match="guard_every_step needs guard=True"):
        PolicyController(grid=GRID, policy=pcfg, guard_every_step=True)
