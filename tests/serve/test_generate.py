"""Generation: dense (batching, greedy equivalence, EOS, sampling) and controlled (episodes with dense
replay, teacher-forced scoring, ``soljax generate --policy``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_lm, write_policy_run
from soljax.errors import SoljaxError
from soljax.distributions import sample_token
from soljax.serve.generate import generate
from soljax.lm import decode_step, logits, prefill

CFG, PARAMS = tiny_lm(seed=3, vocab_size=61, num_kv_heads=1)
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 8, 4, 11, 13, 2], [20]]


def _greedy_reference(prompt, n):
    """Token-by-token greedy decoding of one prompt with no padding at all."""
    ids = jnp.array([prompt])
    h, cache = prefill(CFG, PARAMS, ids, jnp.array([len(prompt)]), len(prompt) + n)
    step = logits(CFG, PARAMS, h[:, -1])
    out = []
    for _ in range(n):
        tok = jnp.argmax(step, axis=-1)
        out.append(int(tok[0]))
        step, _, cache = decode_step(CFG, PARAMS, cache, tok)
    return out


def test_mixed_length_batch_equals_each_prompt_alone():
    batch = generate(CFG, PARAMS, PROMPTS, 12)
    for prompt, got in zip(PROMPTS, batch):
        assert got == generate(CFG, PARAMS, [prompt], 12)[0]
        assert got == _greedy_reference(prompt, 12)


def test_eos_stops_a_row_and_is_included():
    ref = _greedy_reference(PROMPTS[1], 12)
    eos = ref[4]
    first = ref.index(eos)
    out = generate(CFG, PARAMS, PROMPTS, 12, eos_ids=(eos,))
    assert out[1] == ref[: first + 1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    a = generate(CFG, PARAMS, PROMPTS, 8, temperature=1.0, seed=1)
    b = generate(CFG, PARAMS, PROMPTS, 8, temperature=1.0, seed=1)
    assert a == b
    assert generate(CFG, PARAMS, PROMPTS, 8, temperature=1.0, top_p=1e-6) == generate(CFG, PARAMS, PROMPTS, 8)


def test_top_p_keeps_only_the_nucleus():
    logits_bv = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = np.asarray(jax.vmap(lambda k: sample_token(logits_bv, k, 1.0, 0.7)[0])(keys))
    assert set(draws) == {0, 1}


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}])
def test_bad_arguments(kwargs):
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(SoljaxError):
        generate(CFG, PARAMS, PROMPTS, args.pop("max_new_tokens"), **args)
    with pytest.raises(SoljaxError):
        generate(CFG, PARAMS, [[]], 4)


# ----------------------------------------------------------------------------------------------
# Controlled generation and teacher-forced scoring (episodes with dense replay).
# The tests share compiled programs: batches of 5 rows (or 1), prompts under 64 tokens, so every
# call pads to width 64 and a cache capacity of 128.

from soljax import cli  # noqa: E402
from soljax.compress.actions import ActionGrid  # noqa: E402
from soljax.config import TrainConfig  # noqa: E402
from soljax.control import GivenControls, PolicyController  # noqa: E402
from soljax.engine.episodes import ControlledModel, run_episode, start  # noqa: E402
from soljax.runs import load_controlled  # noqa: E402
from soljax.compress.targets import parse_target as parse_targets  # noqa: E402
from soljax.serve.generate import (controlled_generate, dense_logprobs, realized_budget,  # noqa: E402
                                   score_continuations)
from soljax.lm.checkpoint import save_model  # noqa: E402
from soljax.lm.controlled import Controls, SparsityConfig, page_summaries_of  # noqa: E402
from soljax.control.network import PolicyConfig, init_policy  # noqa: E402
from soljax.engine.rollout import rollout  # noqa: E402
from soljax.lm.tokenizer import Tokenizer  # noqa: E402

T = 4
SCFG = SparsityConfig(page_size=4, sink_tokens=1, window_tokens=1)
GRID = ActionGrid(keep_fracs=(0.1, 1.0), struct_prune_choices=("s60", "s100"), quant_choices=("q5", "q16"))
PCFG = PolicyConfig(d_model=32, n_heads=2, max_len=8)
VARIABLES = init_policy(PCFG, GRID.num_actions, 32, 32, jax.random.PRNGKey(1))
POLICY = ControlledModel(CFG, PARAMS, SCFG, PolicyController(grid=GRID, policy=PCFG, greedy=True), VARIABLES, T)
TARGETS = (0.5, 0.6, 0.5)
STREAM = [(7 * i + 3) % 61 for i in range(40)]
PROMPTS5 = PROMPTS + [STREAM[:21], [5, 9, 3, 1, 2, 8, 8, 4, 11, 13, 2, 7, 7, 30]]


def _controls(kappa, rho, bits, B=5):
    """Raw controls ``[B, 1, T]`` for the given_controls controller (the same schedule every episode)."""
    return Controls(*(jnp.broadcast_to(jnp.asarray(a, dt), (B, 1, T))
                      for a, dt in ((kappa, jnp.float32), (rho, jnp.float32), (bits, jnp.int32))))


def test_controlled_mixed_length_batch_equals_each_prompt_alone():
    batch = controlled_generate(POLICY, PROMPTS5, 11, TARGETS)
    assert any((g.usage[g.effective] < 1).any() for g in batch)  # the policy really compresses
    assert len({tuple(g.actions) for g in batch}) > 1
    conts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [3], [40, 41], [9, 9, 9, 9, 9], [60]]
    scores = score_continuations(POLICY, PROMPTS5, conts, TARGETS)
    for i, (prompt, got) in enumerate(zip(PROMPTS5, batch)):
        alone = controlled_generate(POLICY, [prompt], 11, TARGETS)[0]
        assert got.tokens == alone.tokens and len(got.tokens) == 11
        np.testing.assert_array_equal(got.actions, alone.actions)
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=2e-5)
        alone = score_continuations(POLICY, [prompt], [conts[i]], TARGETS)[0]
        assert scores[i].logprobs.shape == scores[i].usage.shape[:1] == (len(conts[i]),)
        np.testing.assert_allclose(scores[i].logprobs, alone.logprobs, atol=2e-5)
        np.testing.assert_array_equal(scores[i].actions, alone.actions)
    # scoring a generated continuation reproduces its log-probs (same actions, same cache)
    again = score_continuations(POLICY, PROMPTS5, [g.tokens for g in batch], TARGETS)
    for g, s in zip(batch, again):
        np.testing.assert_allclose(s.logprobs, g.logprobs, atol=2e-5)
        assert s.is_greedy


def test_dense_controls_give_exactly_the_plain_greedy_output():
    dense_first = jax.tree.map(lambda a: a, VARIABLES)  # a policy that always picks the dense action
    dense_first["params"]["pi_head"]["bias"] = VARIABLES["params"]["pi_head"]["bias"].at[GRID.dense_idx].add(1e4)
    models = [ControlledModel(CFG, PARAMS, SCFG, GivenControls(), _controls(1.0, 1.0, 16), T),
              ControlledModel(CFG, PARAMS, SCFG, POLICY.controller, dense_first, T)]
    plain = generate(CFG, PARAMS, PROMPTS5, 12)
    ref = dense_logprobs(CFG, PARAMS, PROMPTS5, plain)
    for model in models:
        out = controlled_generate(model, PROMPTS5, 12, (1.0, 1.0, 1.0))
        assert [g.tokens for g in out] == plain
        for g, lp in zip(out, ref):
            np.testing.assert_allclose(g.logprobs, lp, atol=2e-5)
            assert (g.usage == 1).all() and g.stop_reason == "length"


def _episodes(controls, replay=True, n_episodes=2):
    """``n_episodes`` greedy episodes of PROMPTS5 under raw ``controls``: ``(state, the tokens of each
    row so far, the episodes' outputs)``."""
    B, cap = len(PROMPTS5), 128
    tokens = np.zeros((B, 64), np.int32)
    for i, p in enumerate(PROMPTS5):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in PROMPTS5])
    state = start(CFG, SCFG, PARAMS, jnp.asarray(tokens), jnp.asarray(lengths), cap, jax.random.PRNGKey(0))
    no = jnp.zeros((B, T), jnp.int32)
    seqs, outs = [p[:-1] for p in PROMPTS5], []
    for _ in range(n_episodes):
        state, out = run_episode(CFG, SCFG, PARAMS, GivenControls(), controls, jnp.ones((B, 3), jnp.float32), state,
                                 no, no > 0, jnp.full((B,), T), steps=T, replay=replay)
        seqs = [s + np.asarray(out.inputs)[i].tolist() for i, s in enumerate(seqs)]
        outs.append(out)
    return state, seqs, outs


def test_episode_refresh_makes_the_cache_a_dense_prefill_of_the_same_tokens():
    # two episodes of aggressive compression, each followed by its dense replay
    state, seqs, outs = _episodes(_controls(0.1, 0.6, 5))
    for out in outs:
        assert (np.asarray(out.usage)[np.asarray(out.effective)] < 1).all()
        inputs, nxt = np.asarray(out.inputs), np.asarray(out.next_tokens)
        assert inputs[:, 1:].tolist() == nxt[:, :-1].tolist()
    _assert_dense_prefill_state(state, seqs)
    assert np.asarray(state.token).tolist() == nxt[:, -1].tolist()


def _dense_prefill_of(seqs):
    full = np.zeros((len(seqs), 64), np.int32)
    for i, s in enumerate(seqs):
        full[i, : len(s)] = s
    n = np.array([len(s) for s in seqs])
    h, cache = prefill(CFG, PARAMS, jnp.asarray(full), jnp.asarray(n), 128)
    return n, h, cache


def _assert_dense_prefill_state(state, seqs):
    """The state holds what a dense prefill of ``seqs`` gives: the cache, the last hidden state and
    the page summaries (carried from episode to episode)."""
    n, h_ref, ref = _dense_prefill_of(seqs)
    np.testing.assert_array_equal(np.asarray(state.cache.lengths), n)
    for i in range(len(seqs)):
        for a, b in ((state.cache.k, ref.k), (state.cache.v, ref.v)):
            np.testing.assert_allclose(np.asarray(a)[:, i, : n[i]], np.asarray(b)[:, i, : n[i]], atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.h_prev[i]), np.asarray(h_ref[i, n[i] - 1]), atol=1e-5)
    for a, b in zip(state.summaries, page_summaries_of(SCFG, state.cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_the_replay_dense_episodes_leave_the_cache_of_a_dense_prefill():
    # dense steps compute dense entries: skipping the replay changes nothing but the time
    state, seqs, _ = _episodes(_controls(1.0, 1.0, 16), replay=False)
    _assert_dense_prefill_state(state, seqs)


def test_without_the_replay_the_cache_keeps_the_compressed_entries():
    state, seqs, outs = _episodes(_controls(0.1, 0.6, 5), replay=False)
    assert (np.asarray(outs[0].usage)[np.asarray(outs[0].effective)] < 1).all()
    n, _, ref = _dense_prefill_of(seqs)
    first = np.array([len(p) - 1 for p in PROMPTS5])  # where the episodes' entries start
    for a, b in ((state.cache.k, ref.k), (state.cache.v, ref.v)):
        a, b = np.asarray(a), np.asarray(b)
        for i in range(len(seqs)):
            # the prompt's entries and every first layer's (computed before any compression) are dense
            np.testing.assert_allclose(a[:, i, : first[i]], b[:, i, : first[i]], atol=1e-5)
            np.testing.assert_allclose(a[0, i, : n[i]], b[0, i, : n[i]], atol=1e-5)
        # deeper layers keep what the compressed steps computed, which differs from the dense entries
        assert max(np.abs(a[1:, i, first[i]:n[i]] - b[1:, i, first[i]:n[i]]).max() for i in range(len(seqs))) > 1e-3


def test_teacher_forced_episodes_equal_training_rollouts_on_a_dense_prefix():
    rows = [STREAM[i:i + 19] for i in range(0, 15, 3)]  # 5 rows: 10 context + 9 continuation tokens
    ctx, cont = [r[:10] for r in rows], [r[10:] for r in rows]
    sched = Controls(jnp.broadcast_to(jnp.asarray([0.1, 0.5, 1.0, 0.1]), (5, 1, T)),
                     jnp.broadcast_to(jnp.asarray([0.6, 1.0, 0.6, 0.6]), (5, 1, T)),
                     jnp.broadcast_to(jnp.asarray([5, 16, 5, 8], jnp.int32), (5, 1, T)))
    scores = score_continuations(ControlledModel(CFG, PARAMS, SCFG, GivenControls(), sched, T), ctx, cont, TARGETS)
    # the second episode runs on a dense prefix: context + first T - 1 continuation tokens, like a
    # training block whose context is that long
    M = len(ctx[0]) - 1 + T
    traj = rollout(CFG, SCFG, PARAMS, jnp.asarray(rows)[:, : M + T + 1], jnp.ones((5, 3)), GivenControls(), sched,
                   jax.random.PRNGKey(0), context_len=M, schedules=1)
    np.testing.assert_allclose(np.stack([s.logprobs[T:2 * T] for s in scores]), np.asarray(traj.logp_true[:, 0]),
                               atol=2e-5)
    np.testing.assert_allclose(np.stack([s.usage[T:2 * T] for s in scores]), np.asarray(traj.usage[:, 0]), atol=1e-6)
    assert (np.stack([s.usage for s in scores])[..., 0] < 1).any()


def test_controlled_eos_and_stop_strings():
    ref = controlled_generate(POLICY, PROMPTS5, 12, TARGETS)[1].tokens
    eos = ref[5]
    out = controlled_generate(POLICY, PROMPTS5, 12, TARGETS, eos_ids=(eos,))[1]
    assert out.tokens == ref[: ref.index(eos) + 1] and out.stop_reason == "eos"
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    out = controlled_generate(POLICY, PROMPTS5, 12, TARGETS, stop=[f"<{ref[6]}>"], decode=decode)[1]
    assert out.tokens == ref[: ref.index(ref[6]) + 1] and out.stop_reason == "stop"
    assert out.text == decode(ref[: ref.index(ref[6])])


def test_episodes_compile_once_whatever_the_inputs_placement():
    """A restored policy's arrays are committed to a device and so is every episode's output state;
    the first episode's state must be too, or each program compiles twice (once per placement)."""
    committed = ControlledModel(CFG, PARAMS, SCFG, POLICY.controller, jax.device_put(VARIABLES, jax.devices()[0]), T)
    before = run_episode._cache_size()
    # 2 rows (no other test here uses them) and 10 scored tokens: three episodes of the same shapes
    score_continuations(committed, [PROMPTS[0], PROMPTS[2]], [STREAM[:10], STREAM[5:15]], TARGETS)
    assert run_episode._cache_size() - before == 1


def _dense_loving(variables):
    """Policy variables that prefer the dense action by a wide margin (they overspend any target)."""
    out = jax.tree.map(lambda a: a, variables)
    out["params"]["pi_head"]["bias"] = variables["params"]["pi_head"]["bias"].at[GRID.dense_idx].add(20.0)
    return out


GUARDED = ControlledModel(CFG, PARAMS, SCFG, PolicyController(grid=GRID, policy=PCFG, greedy=True, guard=True),
                          _dense_loving(VARIABLES), T)
CAPS = (0.5, 0.8, 0.5)


def _within(budget, caps=CAPS) -> bool:
    return all(budget[a] <= c + 1e-6 for a, c in zip(("token", "prune", "quant"), caps))


def test_guarded_generation_stays_within_the_targets_wherever_it_stops():
    full = controlled_generate(GUARDED, PROMPTS5, 12, CAPS)
    for g in full:  # every stopping point, mid-episode ones included
        for n in range(1, len(g.tokens) + 1):
            b = realized_budget(g.usage[:n], g.effective[:n])
            assert b["effective_steps"] == 0 or _within(b), (n, b)
    # the guard leaves the policy room: some steps still get full compute on some axis
    assert any((g.usage[g.effective] == 1).any() for g in full)
    # a real EOS after the second token, and a stop string after the third: both mid-episode
    ref = full[1].tokens
    (got,) = controlled_generate(GUARDED, [PROMPTS5[1]], 12, CAPS, eos_ids=(ref[1],))
    assert got.stop_reason == "eos" and got.tokens == ref[: ref.index(ref[1]) + 1] and len(got.tokens) < T
    assert got.budget["effective_steps"] == len(got.tokens) and _within(got.budget), got.budget
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    (got,) = controlled_generate(GUARDED, [PROMPTS5[1]], 12, CAPS, stop=[f"<{ref[2]}>"], decode=decode)
    assert got.stop_reason == "stop" and len(got.tokens) < T and _within(got.budget), got.budget


def test_the_guard_refuses_targets_below_the_grid():
    with pytest.raises(SoljaxError, match=r"token keep 0\.05 is below the grid's cheapest level 0\.1 "):
        controlled_generate(GUARDED, PROMPTS5, 4, (0.05, 0.8, 0.5))
    with pytest.raises(SoljaxError, match=r"quant ratio 0\.25 \(4 bits\) is below the grid's cheapest level "
                                          r"0\.3125 \(5 bits\)"):
        score_continuations(GUARDED, PROMPTS5, [[1]] * 5, [(0.5, 0.8, 0.5)] * 4 + [(0.5, 0.8, 0.25)])
    # the floor itself can be held; unguarded, a target below the grid is only a request
    for g in controlled_generate(GUARDED, PROMPTS5, 4, (0.1, 0.6, 0.3125)):
        assert _within(g.budget, (0.1, 0.6, 0.3125)), g.budget
    assert len(controlled_generate(POLICY, PROMPTS5, 4, (0.05, 0.6, 0.5))) == 5


@pytest.mark.parametrize("text", ["0.5,0.6", "0.5,x,8", "0,0.5,0.5", "0.5,0.5,17", "0.5,1.5,8"])
def test_bad_targets(text):
    with pytest.raises(SoljaxError):
        parse_targets(text)


def test_parse_targets_and_controlled_bad_arguments():
    assert parse_targets("0.5, 0.7, 8") == (0.5, 0.7, 0.5)
    assert parse_targets("0.5,0.7,0.25") == (0.5, 0.7, 0.25)
    for call in (lambda: controlled_generate(POLICY, [[]], 4, TARGETS),
                 lambda: controlled_generate(POLICY, PROMPTS, 4, [[0.5, 0.5, 0.5]] * 2),
                 lambda: controlled_generate(POLICY, PROMPTS, 0, TARGETS),
                 lambda: controlled_generate(POLICY, PROMPTS, 4, TARGETS, stop=["x"]),
                 lambda: score_continuations(POLICY, PROMPTS, [[1]], TARGETS),
                 lambda: score_continuations(POLICY, [[1]], [[]], TARGETS)):
        with pytest.raises(SoljaxError):
            call()


# ----------------------------------------------------------------------------------------------
# soljax generate --policy RUN_DIR


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory, word_tokenizer_json):
    """A converted copy of the test LM (word tokenizer w1..w60) and a training run holding POLICY."""
    root = tmp_path_factory.mktemp("policy_run")
    save_model(root / "model", CFG, PARAMS, Tokenizer(word_tokenizer_json(CFG.vocab_size)))
    tcfg = TrainConfig.load(None, [f"model={root / 'model'}", "rollout_len=4", "policy_d_model=32",
                                   "policy_n_heads=2", "policy_max_len=8", "quest_page_size=4", "Ts=1", "Tw=1"])
    write_policy_run(root / "run", tcfg, VARIABLES)
    return root


def test_cli_generate_with_policy_reports_budgets_and_the_dense_comparison(policy_run, capsys):
    prompt = "w5 w9 w3 w1 w2 w8 w8 w4 w11"
    argv = ["generate", "--policy", str(policy_run / "run"), "--targets", "0.5,0.6,8", "--prompt", prompt,
            "--max-new-tokens", "12", "--compare-dense"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"[policy] {prompt}" in out and f"[dense] {prompt}" in out and out.count("mean dense log-prob") == 2
    assert "targets: token keep 0.500, prune keep 0.600, quant ratio 0.500" in out
    assert cli.main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, tok = load_controlled(policy_run / "run")  # the same arrays as the CLI (no new compile)
    assert model.cfg == CFG and model.scfg == SCFG and model.controller == POLICY.controller
    ids = tok.encode(prompt)
    (gen,) = controlled_generate(model, [ids], 12, (0.5, 0.6, 0.5))
    sample = report["samples"][0]
    assert sample["controlled"]["budget"] == gen.budget and report["budget"] == gen.budget
    assert sample["controlled"]["text"] == tok.decode(gen.tokens, skip_special_tokens=True)
    dense = generate(model.cfg, model.params, [ids], 12)[0]
    assert sample["dense"]["text"] == tok.decode(dense, skip_special_tokens=True)
    ref = dense_logprobs(model.cfg, model.params, [ids], [dense])[0].mean()
    assert sample["dense"]["mean_dense_logprob"] == pytest.approx(float(ref))


def test_cli_generate_with_the_budget_guard_stays_within_the_targets(policy_run, capsys):
    argv = ["generate", "--policy", str(policy_run / "run"), "--prompt", "w5 w9 w3 w1 w2 w8 w8 w4 w11",
            "--max-new-tokens", "12", "--json", "--guard"]
    for targets in ((0.3, 0.6, 0.3125), (0.6, 0.8, 0.5)):
        assert cli.main(argv + ["--targets", ",".join(map(str, targets))]) == 0
        budget = json.loads(capsys.readouterr().out)["budget"]
        assert budget["effective_steps"] > 0
        assert all(budget[a] <= t + 1e-5 for a, t in zip(("token", "prune", "quant"), targets)), budget
    assert cli.main(argv + ["--targets", "0.5,0.6,8", "--controller", "fixed"]) == 2
    assert "guard applies to the policy" in capsys.readouterr().err


def test_cli_generate_guard_refuses_a_target_below_the_grid(policy_run, capsys):
    rc = cli.main(["generate", "--policy", str(policy_run / "run"), "--prompt", "w5 w9 w3", "--guard",
                   "--targets", "0.5,0.6,4"])
    err = capsys.readouterr().err
    assert rc == 2 and "quant ratio 0.25 (4 bits) is below the grid's cheapest level 0.3125 (5 bits)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--targets", "0.5,0.6"], "three comma-separated"),
    (["--targets", "0.5,abc,8"], "must be numbers"),
    (["--targets", "0.5,0.6,40"], "bit width"),
    ([], "--policy needs --targets"),
])
def test_cli_generate_policy_errors(policy_run, capsys, args, needle):
    rc = cli.main(["generate", "--policy", str(policy_run / "run")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_cli_generate_policy_flags_need_a_run(policy_run, tmp_path, capsys):
    assert cli.main(["generate", "--policy", str(tmp_path / "missing"), "--targets", "0.5,0.5,0.5"]) == 2
    assert "no such training run directory" in capsys.readouterr().err
    assert cli.main(["generate", "--policy", str(tmp_path), "--targets", "0.5,0.5,0.5"]) == 2
    assert "not a soljax training run" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(policy_run / "model"), "--targets", "0.5,0.5,0.5"]) == 2
    assert "--targets needs --policy" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(policy_run / "model"), "--guard"]) == 2
    assert "--guard needs --policy" in capsys.readouterr().err


def test_cli_generate_on_the_cpu_kernels_decodes_what_the_xla_path_does(policy_run, capsys):
    """``--impl cpu``: the C++ attention and MLP kernels in every step and the kernel's dense replay
    give the same tokens, budgets and log-probabilities (the fixed schedule at 16 bits: no rounding
    boundary to flip); scored over several episodes, so the replayed cache is read."""
    argv = ["generate", "--policy", str(policy_run / "run"), "--controller", "fixed", "--targets", "0.5,0.6,16",
            "--prompt", "w5 w9 w3 w1 w2 w8 w8 w4 w11", "--max-new-tokens", "12", "--json"]
    reports = []
    for impl in ("xla", "cpu"):
        assert cli.main(argv + ["--impl", impl]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    xla, cpu = reports
    assert cpu["samples"][0]["controlled"]["text"] == xla["samples"][0]["controlled"]["text"]
    assert cpu["budget"] == pytest.approx(xla["budget"]) and xla["budget"]["token"] < 0.9  # really sparse
    (want, got) = (score_continuations(load_controlled(policy_run / "run", controller="fixed", impl=impl)[0],
                                       [PROMPTS5[0]], [list(range(3, 17))], (0.5, 0.6, 1.0))[0]
                   for impl in ("xla", "cpu"))
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-4)
