"""The embedded SmolLM2-135M-Instruct (converted from its GGUF) against stored references.

References (no torch needed at test time):

- ``fixtures/embedded_smollm2.{npz,json}``: transformers' fp32 outputs on the same GGUF (written
  by ``fixtures/make_embedded_fixture.py``): tokenizer ids, prompt logits, greedy continuation,
  windowed mean NLL of the start of *Persuasion*.
- the ``golden`` section of the JSON: block 20 of *Persuasion* and the dense per-step log-probs
  of the SOL PyTorch reference (copied from ``shared/golden/reference_rollouts.json``).

Skipped when the embedded model is not in the cache, unless ``SOLJAX_REQUIRE_ASSETS=1``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import skip_or_fail
from soljax import lm
from soljax.data import assets
from soljax.eval.ppl import perplexity

pytestmark = [pytest.mark.embedded,
              pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REF = dict(np.load(FIXTURES / "embedded_smollm2.npz"))
META = json.loads((FIXTURES / "embedded_smollm2.json").read_text())
GOLDEN = META["golden"]

LOGIT_TOL = 1e-3
NLL_TOL = 1e-4
GOLDEN_LP_TOL = 1e-3
CAPACITY = GOLDEN["context"] + GOLDEN["steps"]  # one cache size (and decode compile) for all tests




@pytest.fixture(scope="module")
def model(embedded_model):
    cfg, params, tokenizer = embedded_model
    assert cfg.dtype == "float32" and cfg.vocab_size == 49152 and cfg.num_layers == 30
    return cfg, params, tokenizer


@pytest.fixture(scope="module")
def persuasion_ids(model):
    path = assets.text_path("persuasion")
    if not path.is_file():
        skip_or_fail(f"Persuasion not fetched ({path} is missing; run soljax.data.assets.ensure_assets())")
    return np.asarray(model[2].encode(path.read_text(encoding="utf-8")), np.int32)


def greedy(cfg, params, prompt, num_new: int, capacity: int) -> list[int]:
    """Greedy decoding: dense prefill, then one decode step per new token (argmax each time)."""
    prompt = jnp.asarray(prompt, jnp.int32)[None]
    h, cache = lm.prefill(cfg, params, prompt, jnp.asarray([prompt.shape[1]], jnp.int32), capacity)
    token = jnp.argmax(lm.logits(cfg, params, h[:, -1]), axis=-1).astype(jnp.int32)
    out = [int(token[0])]
    for _ in range(num_new - 1):
        step_logits, _, cache = lm.decode_step(cfg, params, cache, token)
        token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
        out.append(int(token[0]))
    return out


# ----------------------------------------------------------------------------- vs transformers


def test_tokenizer_matches_transformers(model):
    tok = model[2]
    assert tok.encode(META["prompt"]) == REF["prompt_ids"].tolist()
    for case in META["tokenizer_cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"], case["text"]
    assert tok.decode(REF["greedy_ids"]) == META["greedy_text"]


def test_prompt_logits_match_transformers(model):
    cfg, params, _ = model
    ids = jnp.asarray(REF["prompt_ids"])[None]
    logits = np.asarray(lm.logits(cfg, params, lm.forward(cfg, params, ids))[0])  # [T, V]
    assert logits.shape == (len(REF["prompt_ids"]), cfg.vocab_size)
    diff = np.abs(logits[:, REF["vocab_subset"]] - REF["logits_subset"]).max()
    assert diff <= LOGIT_TOL, diff
    x = logits.astype(np.float64)
    lse = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    assert np.abs(lse - REF["logsumexp"]).max() <= LOGIT_TOL
    assert logits.argmax(-1).tolist() == REF["argmax"].tolist()


def test_greedy_continuation_matches_transformers(model):
    cfg, params, _ = model
    got = greedy(cfg, params, REF["prompt_ids"], META["num_new_tokens"], CAPACITY)
    assert got == REF["greedy_ids"].tolist()


def test_windowed_perplexity_matches_transformers(model):
    cfg, params, _ = model
    passage = META["passage"]
    got = perplexity(cfg, params, REF["passage_ids"], window=passage["window"])
    assert got["tokens"] == passage["scored_tokens"]
    assert abs(got["mean_nll"] - passage["mean_nll"]) <= NLL_TOL


# ----------------------------------------------------------------------------- golden reference


def test_golden_tokenization_of_persuasion(persuasion_ids):
    assert len(persuasion_ids) == GOLDEN["persuasion_num_tokens"] == 115_861
    start = GOLDEN["token_offset"]
    assert start == 273 * GOLDEN["block_index"]
    assert persuasion_ids[start:start + 273].tolist() == GOLDEN["token_ids"]
    assert persuasion_ids[:len(REF["passage_ids"])].tolist() == REF["passage_ids"].tolist()


def test_golden_dense_rollout(model):
    """Dense prefill of block[:M], then T decode steps teacher-forced with block[M + t]."""
    cfg, params, _ = model
    block = np.asarray(GOLDEN["token_ids"], np.int32)
    M, T = GOLDEN["context"], GOLDEN["steps"]
    h, cache = lm.prefill(cfg, params, jnp.asarray(block[None, :M]), jnp.asarray([M], jnp.int32),
                          CAPACITY)
    last = np.asarray(h[0, -1])
    assert np.linalg.norm(last) == pytest.approx(GOLDEN["prefill_last_hidden_norm"], rel=1e-4)
    logp = np.asarray(jax.nn.log_softmax(lm.logits(cfg, params, h[0]), axis=-1))  # [M, V]
    assert logp[M - 1, block[M]] == pytest.approx(GOLDEN["prefill_lp_of_token_M"], abs=GOLDEN_LP_TOL)
    prefill_nll = -logp[np.arange(M - 1), block[1:M]].astype(np.float64).mean()
    assert prefill_nll == pytest.approx(GOLDEN["prefill_mean_nll_tokens_1_to_M-1"], abs=NLL_TOL)

    lp_gt, h_norm = [], []
    for t in range(T):
        step_logits, h_t, cache = lm.decode_step(cfg, params, cache, jnp.asarray([block[M + t]]))
        lp_gt.append(float(jax.nn.log_softmax(step_logits[0])[block[M + t + 1]]))
        h_norm.append(float(jnp.linalg.norm(h_t[0])))
    np.testing.assert_allclose(lp_gt, GOLDEN["dense_lp_gt"], rtol=0, atol=GOLDEN_LP_TOL)
    np.testing.assert_allclose(h_norm, GOLDEN["dense_h_norm"], rtol=1e-4)
