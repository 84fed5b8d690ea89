"""Evaluation and generation put the LM on every device: its weights split over a ``model`` axis by
the training rules, the policy replicated beside it, results equal to one device's.

The sharded side runs on 4 simulated CPU devices in a subprocess (tests/eval/sharded_eval_worker.py;
the device count is fixed when JAX starts); the one-device side runs the same calls here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import tiny_lm, worker_output, write_policy_run
from soljax import parallel
from soljax.config import TrainConfig
from soljax.control.network import init_policy
from soljax.config import action_grid, policy_config
from soljax.lm.checkpoint import save_model
from soljax.lm.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
import sharded_eval_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 4
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def results(tmp_path_factory, word_tokenizer_json):
    """The worker's results on 4 devices and the same calls on this process's one device."""
    root = tmp_path_factory.mktemp("sharded_eval")
    cfg, params = tiny_lm()  # 4 query heads, 2 KV heads, MLP 64, vocabulary 97: on a model axis of 4
    save_model(root / "model", cfg, params, Tokenizer(word_tokenizer_json(cfg.vocab_size)))
    tcfg = TrainConfig.load(None, [f"model={root / 'model'}", "context_len=16", "rollout_len=4", "policy_d_model=32",
                                   "policy_n_heads=2", "policy_max_len=8", "quest_page_size=4", "Ts=1", "Tw=1",
                                   "keep_fracs=[0.25, 1.0]"])
    variables = init_policy(policy_config(tcfg), action_grid(tcfg).num_actions, cfg.hidden_size, cfg.hidden_size,
                            jax.random.PRNGKey(3))
    write_policy_run(root / "run", tcfg, variables)
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text(" ".join(f"w{i}" for i in rng.integers(1, cfg.vocab_size, 400)))
    flags = f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, SOLJAX_CACHE_DIR=str(root / "cache4"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "sharded_eval_worker.py"), str(root)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SOLJAX_CACHE_DIR", str(root / "cache1"))
            one = worker.evaluate(root)  # meanwhile, on this process's single device
    finally:
        many = worker_output(proc, TIMEOUT_S)[-1]
    return {"one": one, "many": many}


def test_the_lm_is_split_over_a_model_axis_and_the_policy_replicated(results):
    many, one = results["many"]["placement"], results["one"]["placement"]
    assert one["devices"] == 1 and many["devices"] == DEVICES
    lm = many["lm"]
    spec = {k.split("'")[-2]: v for k, v in lm.items()}  # leaf name -> [spec, shard shape, shape]
    # heads, MLP width split 4 ways; 2 KV heads and the 97-word vocabulary do not divide: replicated
    assert spec["wq"][0] == [None, None, "model"] and spec["wq"][1][2] == spec["wq"][2][2] // DEVICES
    assert spec["wo"][1][1] == spec["wo"][2][1] // DEVICES
    for name in ("w_gate", "w_up"):
        assert spec[name][1][2] == spec[name][2][2] // DEVICES
    assert spec["w_down"][1][1] == spec["w_down"][2][1] // DEVICES
    for name in ("wk", "wv", "embed", "attn_norm"):
        assert spec[name][0] == [] and spec[name][1] == spec[name][2], name
    assert many["policy_devices"] == [DEVICES] and many["policy_replicated"]


def test_sharded_results_equal_one_device(results):
    one, many = results["one"], results["many"]
    for a, b in zip(one["continuations"], many["continuations"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert many["generated"] == one["generated"]
    assert set(many["sweep"]) == set(one["sweep"]) and {"policy", "fixed", "dense"} <= set(one["sweep"])
    for method, ppl in one["sweep"].items():
        assert many["sweep"][method] == pytest.approx(ppl, rel=1e-4), method
    np.testing.assert_allclose(many["schedules"], one["schedules"], rtol=1e-4, atol=1e-4)
    assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-4)


def test_one_device_keeps_the_plain_path():
    assert parallel.serving_plan(jax.devices()[:1]) is None
    assert parallel.serving_lm_sharding(jax.devices()[:1]) is None
    tree = {"w": jax.numpy.ones(3)}
    assert parallel.replicate_on(tree, tiny_lm()[1]) is tree
