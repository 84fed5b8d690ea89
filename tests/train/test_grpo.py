"""GRPO pieces on small hand-computed cases: rewards, returns, budget penalty, advantages, PPO loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soljax.train import objective as grpo
from soljax.compress import ActionGrid
from soljax.compress.actions import AXES
from soljax.errors import SoljaxError
from soljax.train.objective import GRPOConfig

TIGHT = dict(rtol=1e-6, atol=1e-6)
SQ3 = 1.7320508075688772


def close(actual, expected, **tol):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float64), **(tol or TIGHT))


# ------------------------------------------------------------------------------ rewards and returns

def test_rewards_plain_and_with_kl():
    logp = jnp.array([[[-1.0, -2.0]]])
    kl = jnp.array([[[0.5, 1.0]]])
    close(grpo.rewards(logp, None, 0.0), [[[-1.0, -2.0]]])
    close(grpo.rewards(logp, kl, 0.0), [[[-1.0, -2.0]]])
    # (1 - 0.25) * logp - 0.25 * KL
    close(grpo.rewards(logp, kl, 0.25), [[[-0.875, -1.75]]])
    close(grpo.rewards(logp, kl, 1.0), [[[-0.5, -1.0]]])
    with pytest.raises(SoljaxError, match="kl_dense is None"):
        grpo.rewards(logp, None, 0.25)


R4 = [-1.0, -3.0, -1.0, -4.0]


def test_returns_sum_max_none_gamma_half():
    r = jnp.array(R4)
    # G3 = -4; G2 = -1 + .5*-4 = -3; G1 = -3 + .5*-3 = -4.5; G0 = -1 + .5*-4.5 = -3.25
    close(grpo.returns(r, 0.5, "sum"), [-3.25, -4.5, -3.0, -4.0])
    # G3 = -4; G2 = max(-1, -2) = -1; G1 = max(-3, -.5) = -.5; G0 = max(-1, -.25) = -.25
    close(grpo.returns(r, 0.5, "max"), [-0.25, -0.5, -1.0, -4.0])
    close(grpo.returns(r, 0.5, None), R4)
    # gamma 0: the reward-to-go is the reward itself
    close(grpo.returns(r, 0.0, "sum"), R4)


def test_returns_batched_over_leading_axes():
    r = jnp.array([[R4, [0.0, 0.0, 0.0, 2.0]]])  # [B=1, K=2, T=4]
    close(grpo.returns(r, 0.5, "sum"), [[[-3.25, -4.5, -3.0, -4.0], [0.25, 0.5, 1.0, 2.0]]])


def test_returns_valid_mask():
    r = jnp.array(R4)
    # trailing padding: the last step is no part of the episode
    close(grpo.returns(r, 0.5, "sum", jnp.array([1, 1, 1, 0], bool)), [-2.75, -3.5, -1.0, 0.0])
    close(grpo.returns(r, 0.5, "max", jnp.array([1, 1, 1, 0], bool)), [-0.25, -0.5, -1.0, 0.0])
    # an invalid step inside is skipped without discounting over it
    close(grpo.returns(r, 0.5, "sum", jnp.array([1, 0, 1, 1], bool)), [-2.5, 0.0, -3.0, -4.0])
    close(grpo.returns(r, 0.5, None, jnp.array([1, 0, 1, 1], bool)), [-1.0, 0.0, -1.0, -4.0])
    close(grpo.returns(r, 0.5, "sum", jnp.ones(4, bool)), grpo.returns(r, 0.5, "sum"))


def test_returns_bad_agg():
    with pytest.raises(SoljaxError, match="reward_agg"):
        grpo.returns(jnp.zeros(3), 0.5, "mean")


# ------------------------------------------------------------------------------ budget penalty

# B=1, K=3 rollouts; targets (token 0.5, prune 0.6, quant 0.5); alphas 100/100/200, deadzone 0.02
USAGE = {"token": jnp.array([[0.5, 0.51, 0.3]]),
         "prune": jnp.array([[0.7, 0.9, 0.6]]),
         "quant": jnp.array([[0.5, 0.3125, 0.5]])}
TARGETS = jnp.array([[0.5, 0.6, 0.5]])
# k0: prune (0.1 - .02)^2 * 100 = 0.64
# k1: token inside the zone (0.01) = 0; prune (0.3 - .02)^2 * 100 = 7.84;
#     quant under target (0.1875 - .02)^2 * 200 = 5.61125
# k2: token under target (0.2 - .02)^2 * 100 = 3.24
PEN = [[0.64, 7.84 + 5.61125, 3.24]]


def test_budget_penalty_deadzone_two_sided():
    close(grpo.budget_penalty(USAGE, TARGETS, (100.0, 100.0, 200.0), 0.02), PEN, rtol=1e-5, atol=1e-6)
    # per-rollout targets [B, K, 3] give the same when they repeat the block's target
    per_k = jnp.broadcast_to(TARGETS[:, None, :], (1, 3, 3))
    close(grpo.budget_penalty(USAGE, per_k, (100.0, 100.0, 200.0), 0.02), PEN, rtol=1e-5, atol=1e-6)
    # without dead zone: k0 = 0.1^2 * 100 + 0 = 1; k1 = .01^2*100 + .3^2*100 + .1875^2*200
    close(grpo.budget_penalty(USAGE, TARGETS, (100.0, 100.0, 200.0), 0.0),
          [[1.0, 0.01 + 9.0 + 7.03125, 4.0]], rtol=1e-5, atol=1e-6)
    # everything inside the dead zone: no penalty
    near = {a: jnp.array([[c + 0.015]]) for a, c in zip(AXES, (0.5, 0.6, 0.5))}
    close(grpo.budget_penalty(near, TARGETS, (100.0, 100.0, 200.0), 0.02), [[0.0]])


def test_budget_penalty_zeroed_axes_from_grid():
    grid = ActionGrid(keep_fracs=[0.1, 1.0], struct_prune_choices=["s100"], quant_choices=["q5", "q16"])
    alphas = grpo.penalty_alphas(grid, (100.0, 100.0, 200.0))
    assert alphas == (100.0, 0.0, 200.0)
    assert GRPOConfig().penalty_alphas(grid) == (100.0, 0.0, 200.0)
    assert GRPOConfig().penalty_alphas() == (100.0, 100.0, 200.0)
    close(grpo.budget_penalty(USAGE, TARGETS, alphas, 0.02), [[0.0, 5.61125, 3.24]], rtol=1e-5, atol=1e-6)
    token_only = ActionGrid(keep_fracs=[0.1, 1.0])
    assert grpo.penalty_alphas(token_only, (100.0, 100.0, 200.0)) == (100.0, 0.0, 0.0)


def test_budget_penalty_missing_axis():
    with pytest.raises(SoljaxError, match="missing axes"):
        grpo.budget_penalty({"token": USAGE["token"]}, TARGETS, (1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------ advantages

def test_process_center_k2():
    # R[b=0, k, t]: k0 = [1, 4], k1 = [3, 2]; step means 2 and 3
    R = jnp.array([[[1.0, 4.0], [3.0, 2.0]]])
    close(grpo.advantages(R, "process", "center", whiten_global=False), [[[-1.0, 1.0], [1.0, -1.0]]])


R_K3 = jnp.array([[[0.0, 1.0], [3.0, 1.0], [6.0, 1.0]]])  # B=1, K=3, T=2; step 1 identical


def test_process_center_and_zscore_k3():
    close(grpo.advantages(R_K3, "process", "center", whiten_global=False),
          [[[-3.0, 0.0], [0.0, 0.0], [3.0, 0.0]]])
    # step 0: deviations (-3, 0, 3), population std sqrt(6); step 1: std 0 -> floor, deviations 0
    s6 = 2.449489742783178
    close(grpo.advantages(R_K3, "process", "zscore", whiten_global=False),
          [[[-3.0 / s6, 0.0], [0.0, 0.0], [3.0 / s6, 0.0]]])


def test_zscore_std_floor():
    # a spread of 1e-7 is below the floor 1e-6: divide by the floor, not by the tiny std
    R = jnp.array([[[0.0], [2e-7]]])
    close(grpo.advantages(R, "process", "zscore", 1e-6, whiten_global=False), [[[-0.1], [0.1]]],
          rtol=1e-4, atol=0)


def test_groups_are_per_block():
    R = jnp.array([[[1.0], [3.0]], [[10.0], [30.0]]])  # B=2, K=2, T=1
    close(grpo.advantages(R, "process", "center", whiten_global=False),
          [[[-1.0], [1.0]], [[-10.0], [10.0]]])


def test_whitening():
    close(grpo.whiten(jnp.array([1.0, 2.0, 3.0, 6.0])),
          [-1.0690449676, -0.5345224838, 0.0, 1.6035674515])
    # centred K=3 example: entries (-3, 0, 0, 0, 3, 0), mean 0, population std sqrt(3)
    close(grpo.advantages(R_K3, "process", "center"), [[[-SQ3, 0.0], [0.0, 0.0], [SQ3, 0.0]]])
    # a constant batch stays finite (std clamped)
    close(grpo.whiten(jnp.full((2, 2), 5.0)), np.zeros((2, 2)))


# r: k0 = [-1, -2], k1 = [-2, -1]; gamma 0.5 -> G: k0 = [-2, -2], k1 = [-2.5, -1]; Pen = (0, 1)
R_SMALL = jnp.array([[[-1.0, -2.0], [-2.0, -1.0]]])
PEN_SMALL = jnp.array([[0.0, 1.0]])


def test_penalized_returns_process_and_outcome():
    G = grpo.returns(R_SMALL, 0.5, "sum")
    close(G, [[[-2.0, -2.0], [-2.5, -1.0]]])
    close(grpo.penalized_returns(G, PEN_SMALL, "process"), [[[-2.0, -2.0], [-3.5, -2.0]]])
    # outcome: G_0 on every step, then the penalty
    close(grpo.penalized_returns(G, PEN_SMALL, "outcome"), [[[-2.0, -2.0], [-3.5, -3.5]]])


def test_outcome_level_broadcasts_g0_only_for_aggregating_returns():
    # max, gamma 0.5: k0 G = (max(-1, 0.5 * -2), -2) = (-1, -2); k1 G = (max(-2, 0.5 * -1), -1) = (-0.5, -1)
    G_max = grpo.returns(R_SMALL, 0.5, "max")
    close(G_max, [[[-1.0, -2.0], [-0.5, -1.0]]])
    close(grpo.penalized_returns(G_max, PEN_SMALL, "outcome", "max"), [[[-1.0, -1.0], [-1.5, -1.5]]])
    # no aggregation: G_t = r_t stays per step (k0 -1, -2; k1 -2 - 1, -1 - 1), not r_0 everywhere
    G_none = grpo.returns(R_SMALL, 0.5, None)
    close(grpo.penalized_returns(G_none, PEN_SMALL, "outcome", None), [[[-1.0, -2.0], [-3.0, -2.0]]])
    close(grpo.penalized_returns(G_none, PEN_SMALL, "process", None), [[[-1.0, -2.0], [-3.0, -2.0]]])
    # through the pipeline: episode sums k0 -3, k1 -5, group mean -4 -> (+1, -1) on every step
    # (broadcasting r_0 would give sums -2, -6 and advantages +-2)
    cfg = GRPOConfig(reward_agg=None, level="outcome", whiten=False)
    adv, diag = grpo.compute_advantages(cfg, R_SMALL, None, USAGE_SMALL, TARGETS, (100.0, 100.0, 200.0))
    close(adv, [[[1.0, 1.0], [-1.0, -1.0]]], rtol=1e-5, atol=1e-5)
    close(diag["penalized_return_mean"], -2.0, rtol=1e-5)
    with pytest.raises(SoljaxError, match="reward_agg"):
        grpo.penalized_returns(G_none, PEN_SMALL, "outcome", "mean")


def test_outcome_level():
    R = jnp.array([[[-2.0, -2.0], [-3.5, -3.5]]])
    # sums over t: -4 and -7, group mean -5.5 -> (+1.5, -1.5) on every step
    close(grpo.advantages(R, "outcome", "center", whiten_global=False), [[[1.5, 1.5], [-1.5, -1.5]]])
    close(grpo.advantages(R, "outcome", "zscore", whiten_global=False), [[[1.0, 1.0], [-1.0, -1.0]]])
    close(grpo.advantages(R, "outcome", "center"), [[[1.0, 1.0], [-1.0, -1.0]]])


# ------------------------------------------------------------------------------ pipeline

# usage giving Pen = (0, 1): token 0.62 vs 0.5 -> (0.12 - 0.02)^2 * 100 = 1
USAGE_SMALL = {"token": jnp.array([[0.5, 0.62]]), "prune": jnp.array([[0.6, 0.6]]),
               "quant": jnp.array([[0.5, 0.5]])}


def test_compute_advantages_grpo_process():
    cfg = GRPOConfig(gamma=0.5, whiten=False)
    adv, diag = grpo.compute_advantages(cfg, R_SMALL, None, USAGE_SMALL, TARGETS, (100.0, 100.0, 200.0))
    # R = k0 [-2, -2], k1 [-3.5, -2]; step means -2.75 and -2
    close(adv, [[[0.75, 0.0], [-0.75, 0.0]]], rtol=1e-5, atol=1e-5)
    close(diag["reward_mean"], -1.5)
    close(diag["penalty_mean"], 0.5, rtol=1e-5)
    close(diag["return_mean"], -1.875)
    close(diag["penalized_return_mean"], -2.375, rtol=1e-5)
    close(diag["usage_token"], 0.56)
    close(diag["gap_token"], 0.06, rtol=1e-5)
    close(diag["gap_prune"], 0.0)
    close(diag["usage_quant"], 0.5)
    # whitened: entries (.75, 0, -.75, 0), population std .75 / sqrt(2)
    adv_w, _ = grpo.compute_advantages(GRPOConfig(gamma=0.5), R_SMALL, None, USAGE_SMALL, TARGETS,
                                       (100.0, 100.0, 200.0))
    close(adv_w, [[[2 ** 0.5, 0.0], [-(2 ** 0.5), 0.0]]], rtol=1e-5, atol=1e-5)


def test_compute_advantages_outcome_and_kl_reward():
    cfg = GRPOConfig(gamma=0.5, level="outcome", whiten=False)
    adv, _ = grpo.compute_advantages(cfg, R_SMALL, None, USAGE_SMALL, TARGETS, (100.0, 100.0, 200.0))
    close(adv, [[[1.5, 1.5], [-1.5, -1.5]]], rtol=1e-5, atol=1e-5)
    # task_w_kl = 1: reward = -KL; KL k0 = (1, 2), k1 = (2, 1) gives the same rewards as above
    cfg_kl = GRPOConfig(gamma=0.5, task_w_kl=1.0, whiten=False)
    adv_kl, diag = grpo.compute_advantages(cfg_kl, jnp.zeros((1, 2, 2)), -R_SMALL, USAGE_SMALL, TARGETS,
                                           (100.0, 100.0, 200.0))
    close(adv_kl, [[[0.75, 0.0], [-0.75, 0.0]]], rtol=1e-5, atol=1e-5)
    close(diag["reward_mean"], -1.5)
    with pytest.raises(SoljaxError, match="kl_dense is None"):
        grpo.compute_advantages(cfg_kl, R_SMALL, None, USAGE_SMALL, TARGETS, (1.0, 1.0, 1.0))


def test_reinforce_estimator():
    cfg = GRPOConfig(gamma=0.5, estimator="reinforce", whiten=False)
    adv, _ = grpo.compute_advantages(cfg, R_SMALL, None, USAGE_SMALL, TARGETS, (100.0, 100.0, 200.0))
    # R = (-2, -2, -3.5, -2), batch mean -2.375
    close(adv, [[[0.375, 0.375], [-1.125, 0.375]]], rtol=1e-5, atol=1e-5)
    adv_w, _ = grpo.compute_advantages(GRPOConfig(gamma=0.5, estimator="reinforce"), R_SMALL, None,
                                       USAGE_SMALL, TARGETS, (100.0, 100.0, 200.0))
    close(adv_w, [[[1 / SQ3, 1 / SQ3], [-SQ3, 1 / SQ3]]], rtol=1e-5, atol=1e-5)


def test_compute_advantages_jits():
    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    logp = -jax.random.uniform(k1, (2, 4, 3), maxval=5.0)
    usage = {a: jax.random.uniform(jax.random.fold_in(k2, i), (2, 4)) for i, a in enumerate(AXES)}
    targets = jnp.array([[0.5, 0.7, 0.5], [0.3, 0.9, 0.8]])
    cfg = GRPOConfig()
    eager, d_eager = grpo.compute_advantages(cfg, logp, None, usage, targets, cfg.penalty_alphas())
    jitted, d_jit = jax.jit(grpo.compute_advantages, static_argnums=0)(
        cfg, logp, None, usage, targets, cfg.penalty_alphas())
    close(jitted, eager, rtol=1e-5, atol=1e-5)
    assert set(d_jit) == set(d_eager)
    assert eager.shape == (2, 4, 3)
    close(jnp.mean(eager), 0.0, atol=1e-5)
    close(jnp.std(eager), 1.0, rtol=1e-4)


# ------------------------------------------------------------------------------ registry and config

def test_registry():
    assert {"grpo", "reinforce"} <= set(grpo.ESTIMATORS)
    assert grpo.get_estimator("grpo") is grpo.ESTIMATORS["grpo"]
    with pytest.raises(SoljaxError, match=r"unknown advantage estimator 'nope' \(known: .*grpo.*reinforce"):
        grpo.get_estimator("nope")

    @grpo.register_estimator("zeros_for_test")
    def zeros(cfg, logp_true, kl, usage, targets, alphas):
        return jnp.zeros_like(logp_true), {}

    try:
        cfg = GRPOConfig(estimator="zeros_for_test")
        adv, diag = grpo.compute_advantages(cfg, R_SMALL, None, USAGE_SMALL, TARGETS, (1.0, 1.0, 1.0))
        close(adv, np.zeros((1, 2, 2)))
        assert diag == {}
    finally:
        grpo.ESTIMATORS.pop("zeros_for_test")
    with pytest.raises(SoljaxError, match="not registered"):
        GRPOConfig(estimator="zeros_for_test")


def test_config_defaults_are_the_official_ones():
    cfg = GRPOConfig()
    assert (cfg.reward_agg, cfg.gamma, cfg.level, cfg.norm) == ("sum", 0.85, "process", "center")
    assert cfg.whiten is True and cfg.std_floor == 1e-6 and cfg.estimator == "grpo"
    assert (cfg.alpha_token, cfg.alpha_prune, cfg.alpha_quant, cfg.deadzone) == (100.0, 100.0, 200.0, 0.02)
    assert (cfg.clip, cfg.entropy_coef, cfg.kl_ref_coef, cfg.task_w_kl) == (0.2, 0.05, 0.0, 0.0)
    assert hash(cfg) == hash(GRPOConfig())
    assert GRPOConfig(reward_agg=None).reward_agg is None
    with pytest.raises(TypeError):
        GRPOConfig("sum")  # keyword-only


@pytest.mark.parametrize("kwargs, message", [
    (dict(reward_agg="mean"), "reward_agg"),
    (dict(gamma=1.0), "gamma"),
    (dict(gamma=-0.1), "gamma"),
    (dict(gamma="0.8"), "gamma"),
    (dict(level="episode"), "level"),
    (dict(norm="whiten"), "norm"),
    (dict(std_floor=0.0), "std_floor"),
    (dict(whiten=1), "whiten"),
    (dict(alpha_token=-1.0), "alpha_token"),
    (dict(alpha_quant=float("nan")), "alpha_quant"),
    (dict(deadzone=-0.01), "deadzone"),
    (dict(task_w_kl=1.5), "task_w_kl"),
    (dict(clip=0.0), "clip"),
    (dict(entropy_coef=-0.1), "entropy_coef"),
    (dict(kl_ref_coef=True), "kl_ref_coef"),
    (dict(estimator="ppo"), "estimator"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(SoljaxError, match=message) as info:
        GRPOConfig(**kwargs)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ PPO loss

# N=2, T=3; logp_old = 0 so ratio = exp(logp_new)
RATIO = np.array([[1.5, 0.5, 1.5], [0.5, 1.1, 1.0]])
ADV = jnp.array([[2.0, -1.0, -1.0], [2.0, 3.0, -0.5]])
ENT = jnp.array([[0.5, 1.0, 1.5], [2.0, 0.25, 0.75]])
# -min(r A, clip(r) A): 1.5*2 -> clipped 2.4 | .5*-1 -> clipped -.8 | 1.5*-1 = -1.5 (unclipped is min)
#                       .5*2 = 1 (unclipped) | 1.1*3 = 3.3 | 1*-.5
PG = np.array([[-2.4, 0.8, 1.5], [-1.0, -3.3, 0.5]])
PER_ENTRY = PG - 0.1 * np.asarray(ENT)  # [[-2.45, .7, 1.35], [-1.2, -3.325, .425]]


def _loss(mask=None, **kw):
    kw = dict(clip=0.2, entropy_coef=0.1) | kw
    return grpo.ppo_loss(jnp.log(jnp.asarray(RATIO, jnp.float32)), jnp.zeros((2, 3)), ADV, ENT, mask, **kw)


def test_ppo_loss_clipping_both_signs():
    loss_sum, denom, aux = _loss()
    close(loss_sum, -4.5, rtol=1e-6, atol=1e-5)
    close(denom, 6.0)
    close(aux["clip_frac"], 4 / 6)
    close(aux["ratio_mean"], 6.1 / 6, rtol=1e-6)
    close(aux["entropy"], 1.0)
    # mean of -log ratio = -(2 ln 1.5 + 2 ln 0.5 + ln 1.1) / 6
    close(aux["approx_kl"], 0.0800089929, rtol=1e-5)
    close(aux["pg_loss"], PG.mean(), rtol=1e-5)


def test_ppo_loss_mask():
    mask = jnp.array([[1, 1, 1], [0, 1, 0]], bool)
    loss_sum, denom, aux = _loss(mask)
    close(loss_sum, -2.45 + 0.7 + 1.35 - 3.325, rtol=1e-6, atol=1e-5)  # -3.725
    close(denom, 4.0)
    close(aux["clip_frac"], 0.75)
    close(aux["entropy"], (0.5 + 1.0 + 1.5 + 0.25) / 4)
    # masked entries may hold garbage without leaking into the loss
    bad_new = jnp.log(jnp.asarray(RATIO, jnp.float32)).at[1, 0].set(jnp.nan)
    s, d, _ = grpo.ppo_loss(bad_new, jnp.zeros((2, 3)), ADV, ENT, mask, 0.2, 0.1)
    close(s, -3.725, rtol=1e-6, atol=1e-5)


def test_ppo_loss_kl_ref_term():
    loss_sum, _, aux = _loss(kl_ref=jnp.full((2, 3), 0.2), kl_ref_coef=0.5)
    close(loss_sum, -4.5 + 6 * 0.1, rtol=1e-6, atol=1e-5)
    close(aux["kl_ref"], 0.2)


def test_ppo_loss_at_ratio_one_is_mean_advantage_and_entropy():
    logp = jnp.array([[-0.3, -1.2], [-2.0, -0.7]])
    adv = jnp.array([[1.0, -2.0], [3.0, 0.5]])
    ent = jnp.array([[0.2, 0.4], [0.6, 0.8]])
    loss_sum, denom, aux = grpo.ppo_loss(logp, logp, adv, ent, None, 0.2, 0.05)
    close(loss_sum / denom, -0.625 - 0.05 * 0.5)
    close(aux["clip_frac"], 0.0)
    close(aux["ratio_mean"], 1.0)
    close(aux["approx_kl"], 0.0)
    # the gradient is the REINFORCE one: d(loss)/d logp_new = -A / N
    def mean_loss(lp):
        s, d, _ = grpo.ppo_loss(lp, logp, adv, ent, None, 0.2, 0.05)
        return s / d

    g = jax.grad(mean_loss)(logp)
    close(g, -np.asarray(adv) / 4)


def test_ppo_loss_accumulation_is_exact():
    key = jax.random.PRNGKey(3)
    ks = jax.random.split(key, 5)
    N, T = 8, 4
    old = -jax.random.uniform(ks[0], (N, T), maxval=3.0)
    new = old + 0.4 * jax.random.normal(ks[1], (N, T))  # many ratios outside [0.8, 1.2]
    adv = jax.random.normal(ks[2], (N, T))
    ent = jax.random.uniform(ks[3], (N, T))
    mask = jax.random.bernoulli(ks[4], 0.7, (N, T)).at[:, 0].set(True)

    @jax.jit
    def part(lp, rows):  # (loss_sum, denom) of the rows where ``rows`` is set, and d loss_sum / d lp
        m = mask & rows[:, None]
        f = lambda x: grpo.ppo_loss(x, old, adv, ent, m, 0.2, 0.05)[:2]  # noqa: E731
        (s, d), g = f(lp), jax.grad(lambda x: f(x)[0])(lp)
        return s, d, g

    def rows(lo, hi):
        return jnp.arange(N) >= lo if hi is None else (jnp.arange(N) >= lo) & (jnp.arange(N) < hi)

    s_all, d_all, g_all = part(new, rows(0, None))
    s1, d1, g1 = part(new, rows(0, 3))
    s2, d2, g2 = part(new, rows(3, None))
    close((s1 + s2) / (d1 + d2), s_all / d_all, rtol=1e-6, atol=1e-7)
    close(d1 + d2, jnp.sum(mask))
    # the same holds for gradients: summed half-gradients over the total count
    close((g1 + g2) / d_all, g_all / d_all, rtol=1e-6, atol=1e-7)
    # and for separately shaped micro-batches (rows 0..2 and 3..7 as their own arrays)
    s_a, d_a, _ = grpo.ppo_loss(new[:3], old[:3], adv[:3], ent[:3], mask[:3], 0.2, 0.05)
    s_b, d_b, _ = grpo.ppo_loss(new[3:], old[3:], adv[3:], ent[3:], mask[3:], 0.2, 0.05)
    close((s_a + s_b) / (d_a + d_b), s_all / d_all, rtol=1e-6, atol=1e-7)
