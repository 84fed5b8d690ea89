"""Downstream adapter: dense mode equals the plain model; offline tasks; a policy/fixed/dense run."""

import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_lm
from soljax.data import assets
from soljax.config import TrainConfig
from soljax.errors import SoljaxError
from soljax.serve.generate import generate
from soljax.eval.harness import _cloze_docs, _mmlu_docs, make_sol_lm, run_downstream
from soljax.runs import controlled_model
from soljax.lm import model as lm
from soljax.train import Trainer

from conftest import require, skip_or_fail

require("lm_eval")

V = 128
LM_CFG, PARAMS = tiny_lm(vocab_size=V, eos_token_ids=(0,))


class CharTokenizer:
    """One token per character (code point mod 127, plus one; 0 is end of text)."""

    def encode(self, text):
        return [1 + ord(c) % (V - 1) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 1) if 33 <= i - 1 < 127 else " " for i in ids if i)


TOK = CharTokenizer()
LM = (LM_CFG, PARAMS, TOK)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    blocks = np.random.default_rng(0).integers(1, V, (8, 16 + 4 + 1))
    cfg = TrainConfig.load(None, ["context_len=16", "rollout_len=4", "batch_size=2", "grpo_rollouts_per_input=2",
                                  "policy_d_model=32", "policy_n_heads=2", "policy_max_len=4", "quest_page_size=4",
                                  "Ts=1", "Tw=1", "max_batches=1", "ppo_target_batch_size=16",
                                  "ppo_minibatch_size=16"])
    out = tmp_path_factory.mktemp("run")
    Trainer(cfg, lm=LM, blocks=blocks).run(out, progress=False)
    return out


def _req(*args):
    return types.SimpleNamespace(args=args)


def _dense_logprobs(ids):
    h = lm.forward(LM_CFG, PARAMS, jnp.asarray([ids]))
    return np.asarray(jax.nn.log_softmax(lm.logits(LM_CFG, PARAMS, h), -1))[0]


def test_dense_mode_gives_the_plain_models_loglikelihoods(run_dir):
    sol = make_sol_lm(controlled_model(LM_CFG, PARAMS, run_dir, controller="dense"), TOK, (1, 1, 1), batch_size=2,
                      max_length=64, progress=False)
    reqs = [_req("the cat sat on", " the mat"), _req("a", " longer continuation that spans episodes"),
            _req("", " empty context")]
    got = sol.loglikelihood(reqs)
    for r, (lp, greedy) in zip(reqs, got):
        ctx, cont = TOK.encode(r.args[0]) or [0], TOK.encode(r.args[1])
        logp = _dense_logprobs(ctx + cont)
        want = [logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)]
        assert lp == pytest.approx(float(np.sum(want)), abs=2e-4)
        assert greedy == all(logp[len(ctx) - 1 + i].argmax() == t for i, t in enumerate(cont))
    text = "a rolling text longer than one window of the model" * 2
    (rolling,) = sol.loglikelihood_rolling([_req(text)])
    ids = TOK.encode(text)
    want = 0.0
    for start in range(0, len(ids), 63):  # windows of max_length - 1, each after the token before it
        ctx = [ids[start - 1]] if start else [0]
        chunk = ids[start:start + 63]
        logp = _dense_logprobs(ctx + chunk)
        want += sum(logp[i, t] for i, t in enumerate(chunk))
    assert rolling == pytest.approx(want, abs=1e-3)
    (gen,) = sol.generate_until([_req("once upon", {"until": ["zzz"], "max_gen_toks": 6})])
    plain = generate(LM_CFG, PARAMS, [TOK.encode("once upon")], 6, eos_ids=(0,))[0]
    assert gen == TOK.decode(plain)
    assert sol.budget["token"] == 1.0 and sol.budget["effective_steps"] > 0
    with pytest.raises(SoljaxError, match="empty continuation"):
        sol.loglikelihood([_req("x", "")])
    with pytest.raises(SoljaxError, match="unknown controller"):
        controlled_model(LM_CFG, PARAMS, run_dir, controller="oracle")


def test_a_run_on_the_kernels_serves_on_the_kernels(run_dir, tmp_path):
    """A run configured for the Pallas kernels decodes small batches on the fast path's kernel branches."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = (run / "config.yaml").read_text()
    for key in ("attention_impl", "mlp_impl"):
        config = config.replace(f"{key}: xla", f"{key}: pallas")
    (run / "config.yaml").write_text(config.replace("kernel_interpret: false", "kernel_interpret: true"))
    fast = controlled_model(LM_CFG, PARAMS, run, controller="fixed").fast
    assert (fast.mlp, fast.attention_impl, fast.interpret) == ("pallas", "pallas", True)
    assert controlled_model(LM_CFG, PARAMS, run_dir, controller="fixed").fast.mlp == "masked"


@pytest.fixture(scope="module")
def offline_data():
    if not assets.text_path("persuasion").is_file() or not assets.mmlu_path().is_file():
        skip_or_fail("the eval corpus and MMLU are not fetched (run `soljax setup`)")


def test_offline_task_data(offline_data):
    docs = _mmlu_docs(3, seed=0)
    assert len(docs) == 9 and {d["subject"] for d in docs} == {"conceptual physics", "high school chemistry",
                                                               "international law"}
    assert all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in docs)
    cloze = _cloze_docs(5, 30, seed=1)
    assert len(cloze) == 5 and all(len(d["context"].split()) == 30 and d["word"].isalpha() for d in cloze)
    assert _cloze_docs(5, 30, seed=1) == cloze


def test_downstream_runs_policy_fixed_and_dense(offline_data, run_dir, tmp_path):
    res = run_downstream(run_dir, [(0.5, 0.8, 0.5)], limit=3, mmlu_per_subject=1, cloze=3, batch_size=16,
                         out_dir=tmp_path, progress=False, lm=LM, guard=True)
    assert [r["mode"] for r in res["rows"]] == ["dense", "policy", "fixed"]
    for r in res["rows"]:
        assert set(r["accuracy"]) == {"soljax_mmlu", "soljax_cloze"}
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["usage"]["effective_steps"] > 0
    dense, pol, fixed = res["rows"]
    assert dense["net_keep"] == 1.0 and pol["net_keep"] < 1.0
    assert fixed["target"] == pytest.approx({a: pol["usage"][a] for a in ("token", "prune", "quant")})
    assert res["guard"]
    assert all(pol["usage"][a] <= t + 1e-5 for a, t in zip(("token", "prune", "quant"), (0.5, 0.8, 0.5)))
    assert (tmp_path / "downstream.json").is_file()


def test_downstream_guard_refuses_a_target_below_the_grid_before_running(run_dir, tmp_path):
    with pytest.raises(SoljaxError, match=r"token keep 0\.05 is below the grid's cheapest level"):
        run_downstream(run_dir, [(0.5, 0.8, 0.5), (0.05, 0.8, 0.5)], limit=3, out_dir=tmp_path, progress=False,
                       lm=LM, guard=True)
    assert not any(tmp_path.iterdir())  # nothing was evaluated or written
