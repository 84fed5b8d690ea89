"""The action fed back to the controller: the applied one (dense on non-effective steps) wherever a
policy is evaluated or served, the sampled one in training (SOL_REFERENCE_SPEC.md section 6.1).

Every case uses sink + window tokens large enough that the first steps are non-effective: with
``Ts = Tw = 9`` a step is effective iff its ``kv_len`` exceeds 19, so a block with a 16-token
context has non-effective steps 0, 1 and 2 (``kv_len`` 17, 18, 19) and effective steps from 3 on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_lm
from soljax.config import TrainConfig, action_grid, policy_config, sparsity_config
from soljax.control.given import GridController, deterministic_logp
from soljax.control.network import init_policy
from soljax.engine import episodes, rollout
from soljax.eval import sweep as sweep_mod
from soljax.train import trainer as trainer_mod

LM_CFG, LM_PARAMS = tiny_lm()
M, T = 16, 8
CFG = TrainConfig.load(None, [f"context_len={M}", f"rollout_len={T}", "policy_d_model=32", "policy_n_heads=2",
                              "policy_max_len=8", "quest_page_size=4", "Ts=9", "Tw=9", "keep_fracs=[0.1,0.5,1.0]",
                              "struct_prune_choices=[s60,s100]", "quant_choices=[q5,q16]"])
GRID = action_grid(CFG)
SCFG = sparsity_config(CFG)
DENSE, BOS = GRID.dense_idx, GRID.bos_id
A_STAR, B_STAR = 0, 1  # two cheap, non-dense actions
BLOCKS = np.random.default_rng(0).integers(0, LM_CFG.vocab_size, (2, M + T + 1))


@dataclasses.dataclass(frozen=True)
class Echo(GridController):
    """Chooses B_STAR right after A_STAR and A_STAR otherwise, so its actions reveal what it was fed."""

    grid: object

    def init(self, ctrl_params, B, K, T):
        return ()

    def act(self, ctrl_params, state, obs, targets, key):
        actions = jnp.where(obs.prev_action == A_STAR, B_STAR, A_STAR).astype(jnp.int32)
        B, K = actions.shape
        return self.controls(actions), actions, deterministic_logp(B, K), state


def test_grid_has_the_cases_the_tests_rely_on():
    assert SCFG.min_effective_kv == 19
    assert DENSE not in (A_STAR, B_STAR) and BOS not in (A_STAR, B_STAR)


def test_rollout_feeds_the_applied_action_unless_training_asks_for_the_sampled_one():
    targets = jnp.ones((2, 3))
    run = lambda **kw: rollout(LM_CFG, SCFG, LM_PARAMS, jnp.asarray(BLOCKS), targets, Echo(GRID), (),  # noqa: E731
                               jax.random.PRNGKey(0), context_len=M, schedules=2, **kw)
    applied, sampled = run(), run(feed_effective=False)
    np.testing.assert_array_equal(np.asarray(applied.effective[0, 0]), [False] * 3 + [True] * 5)
    # fed the applied action: BOS, then dense after each non-effective step, then its own choices
    want_prev = [BOS, DENSE, DENSE, DENSE, A_STAR, B_STAR, A_STAR, B_STAR]
    want_act = [A_STAR, A_STAR, A_STAR, A_STAR, B_STAR, A_STAR, B_STAR, A_STAR]
    assert (np.asarray(applied.prev_action) == want_prev).all()
    assert (np.asarray(applied.actions) == want_act).all()
    # fed the sampled action: its own choices from the first step on
    assert (np.asarray(sampled.prev_action) == [BOS] + [A_STAR, B_STAR] * 3 + [A_STAR]).all()
    assert (np.asarray(sampled.actions) == [A_STAR, B_STAR] * 4).all()


def test_served_episodes_feed_the_applied_action():
    prompt_len = 18  # the prefix holds 17 tokens: kv_len at step t is 18 + t, effective from t = 2
    prompts = jnp.asarray(BLOCKS[:, :prompt_len], jnp.int32)
    state = episodes.start(LM_CFG, SCFG, LM_PARAMS, prompts, jnp.full((2,), prompt_len, jnp.int32), 64,
                           jax.random.PRNGKey(0))
    no_force = jnp.zeros((2, T), bool)
    _, out = episodes.run_episode(LM_CFG, SCFG, LM_PARAMS, Echo(GRID), (), jnp.ones((2, 3)), state,
                                  jnp.zeros((2, T), jnp.int32), no_force, jnp.full((2,), T, jnp.int32), steps=T)
    np.testing.assert_array_equal(np.asarray(out.effective[0]), [False] * 2 + [True] * 6)
    # prev: BOS, dense, dense, then A*, B*, ... -> actions A*, A*, A*, B*, A*, ...
    assert (np.asarray(out.actions) == [A_STAR, A_STAR, A_STAR, B_STAR, A_STAR, B_STAR, A_STAR, B_STAR]).all()


def _policy_preferring(action: int) -> dict:
    pol = init_policy(policy_config(CFG), GRID.num_actions, LM_CFG.hidden_size, LM_CFG.hidden_size,
                      jax.random.PRNGKey(1))
    bias = pol["params"]["pi_head"]["bias"]
    pol["params"]["pi_head"]["bias"] = bias.at[action].add(30.0)
    return pol


def test_the_evaluated_policy_observes_the_dense_action_on_non_effective_steps(monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        seen.append(rollout(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(sweep_mod, "rollout", recording)
    sw = sweep_mod.Sweep((LM_CFG, LM_PARAMS, None), CFG, _policy_preferring(A_STAR),
                         sweep_mod.SweepConfig(num_blocks=2, batch_size=2, targets=((0.5, 0.8, 0.6),)))
    nll, usage, actions = sw._run(jnp.asarray(BLOCKS), None, sw.policy, sw.policy_vars, np.full((2, 3), 0.5), K=1)
    assert (actions == A_STAR).all()  # the greedy policy picks A* on every step, effective or not
    prev = np.asarray(seen[-1].prev_action)[:, 0]  # [B, T]
    assert (prev == [BOS, DENSE, DENSE, DENSE] + [A_STAR] * 4).all()


def test_training_feeds_back_the_sampled_action(monkeypatch):
    """The trainer's rollout asks for the sampled action (what feeding it back does is checked on
    the engine above); tracing the collect step is enough, nothing is compiled."""
    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs.get("feed_effective", "default"))
        return rollout(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "rollout", recording)
    cfg = TrainConfig.load(None, [f"context_len={M}", "rollout_len=4", "batch_size=2", "grpo_rollouts_per_input=4",
                                  "policy_d_model=32", "policy_n_heads=2", "policy_max_len=8", "quest_page_size=4",
                                  "Ts=9", "Tw=9", "ppo_target_batch_size=64", "ppo_minibatch_size=16"])
    tr = trainer_mod.Trainer(cfg, lm=(LM_CFG, LM_PARAMS, None),
                             blocks=np.random.default_rng(1).integers(0, 97, (4, M + 4 + 1)))
    state = jax.eval_shape(tr._init_state_impl)
    jax.eval_shape(tr._collect_impl, LM_PARAMS, state, jax.ShapeDtypeStruct((2, M + 5), jnp.int32))
    assert asked == [False]
