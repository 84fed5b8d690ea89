"""The soljax LM against ``transformers`` on tiny random models (fp32, eager attention).

Each variant is built in the test (no download), saved as a Hugging Face directory, converted with
``soljax.lm.convert.convert`` and loaded with ``load_model``. Checked per variant: full-sequence
logits, prefill followed by decode steps, right-padded batches of mixed lengths (forward, prefill,
decode and ``extend``), and the export back to HF names. Perplexity windows are checked against an
independent torch computation. Needs torch (see ``conftest.require``).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from conftest import require_torch

torch = require_torch()

import jax.numpy as jnp  # noqa: E402

from soljax import lm  # noqa: E402
from soljax.lm.convert import convert  # noqa: E402
from soljax.lm.checkpoint import load_model  # noqa: E402
from soljax.lm.config import RopeScaling  # noqa: E402
from soljax.lm.keymap import params_to_hf  # noqa: E402
from soljax.eval.ppl import perplexity  # noqa: E402

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")]

TOL = 1e-4
SEQ = 40  # past original_max_position_embeddings (16) of the llama3-scaled variants
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}

VARIANTS = {
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4)),
    "llama-mqa-attn-bias": ("llama", dict(num_key_value_heads=1, attention_bias=True, rms_norm_eps=1e-6,
                                          rope_parameters={"rope_type": "default",
                                                           "rope_theta": 500000.0})),
    "llama3-rope-gqa-untied": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3)),
    "llama3-rope-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                           rope_parameters={**LLAMA3, "factor": 4.0})),
    "qwen2-gqa": ("qwen2", dict(num_key_value_heads=2)),
    "qwen3-qknorm-tied": ("qwen3", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}

# The per-variant tests share one batch of 3 random sequences of SEQ tokens (and transformers'
# logits on them) and the same array shapes, so each variant compiles few functions. Causal
# attention makes transformers' logits at positions < n of a full row equal to those of the row's
# first n tokens alone, so they are also the reference for every shorter, right-padded row.
BATCH = 3
PROMPT = 32  # prefill length (rows are right-padded to it); the cache holds SEQ positions


class Variant:
    def __init__(self, name, hf, cfg, params, tokenizer):
        self.name, self.hf, self.cfg, self.params, self.tokenizer = name, hf, cfg, params, tokenizer
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
        self.junk = rng.integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
        self.ref = hf.logits(self.tokens)  # [BATCH, SEQ, V]

    def ours(self, tokens, lengths=None):
        h = lm.forward(self.cfg, self.params, jnp.asarray(tokens),
                       None if lengths is None else jnp.asarray(lengths, jnp.int32))
        return np.asarray(lm.logits(self.cfg, self.params, h))

    def padded(self, lengths, width):
        """The first ``width`` tokens of each row, with junk (not zeros) from ``lengths[b]`` on."""
        keep = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
        return np.where(keep, self.tokens[:, :width], self.junk[:, :width]).astype(np.int32)

    def prefill(self, lengths):
        lengths = np.asarray(lengths, np.int32)
        return lm.prefill(self.cfg, self.params, jnp.asarray(self.padded(lengths, PROMPT)),
                          jnp.asarray(lengths), SEQ)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tiny_hf_model, tmp_path_factory):
    arch, options = VARIANTS[request.param]
    hf = tiny_hf_model(arch, seed=zlib.crc32(request.param.encode()) % 1000, **options)
    out = tmp_path_factory.mktemp("soljax_" + request.param)
    convert(hf.path, out, quiet=True)
    cfg, params, tokenizer = load_model(out)
    return Variant(request.param, hf, cfg, params, tokenizer)


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0))


# ----------------------------------------------------------------------------- per variant


def test_config_read_from_hf(variant):
    cfg, hf = variant.cfg, variant.hf.hf_config
    assert cfg.dtype == "float32"
    assert cfg.num_heads == 4 and cfg.num_layers == 2 and cfg.vocab_size == 160
    assert cfg.num_kv_heads == hf["num_key_value_heads"]
    assert cfg.head_dim == (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    assert cfg.tie_word_embeddings == hf["tie_word_embeddings"]
    assert ("lm_head" in variant.params) == (not cfg.tie_word_embeddings)
    assert cfg.qkv_bias == (hf["model_type"] == "qwen2" or bool(hf.get("attention_bias")))
    assert cfg.o_bias == (hf["model_type"] == "llama" and bool(hf.get("attention_bias")))
    assert cfg.qk_norm == (hf["model_type"] == "qwen3")
    assert cfg.rope_theta == hf["rope_parameters"]["rope_theta"]
    assert cfg.rope_scaling.rope_type == hf["rope_parameters"]["rope_type"]
    if cfg.rope_scaling.rope_type == "llama3":
        rp = hf["rope_parameters"]
        assert cfg.rope_scaling == RopeScaling(
            rope_type="llama3", factor=rp["factor"], low_freq_factor=rp["low_freq_factor"],
            high_freq_factor=rp["high_freq_factor"],
            original_max_position_embeddings=rp["original_max_position_embeddings"])
    assert cfg.rms_norm_eps == pytest.approx(hf["rms_norm_eps"])
    assert variant.tokenizer.vocab_size == cfg.vocab_size
    assert variant.tokenizer.encode("w3 w7 zzz") == [3, 7, 0]


def test_full_sequence_logits(variant):
    ours = variant.ours(variant.tokens)
    assert ours.dtype == np.float32 and ours.shape == variant.ref.shape
    assert np.abs(variant.ref).max() > 1.0  # the random weights give non-trivial logits
    assert max_diff(ours, variant.ref) <= TOL


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("llama3")], indirect=True)
def test_llama3_rope_scaling_is_exercised(variant):
    """Without its scaling the model differs from transformers past the original context (16)."""
    cfg = variant.cfg
    assert cfg.rope_scaling.rope_type == "llama3"
    plain = cfg.replace(rope_scaling=RopeScaling())
    h = lm.forward(plain, variant.params, jnp.asarray(variant.tokens))
    assert max_diff(lm.logits(plain, variant.params, h)[:, 20:], variant.ref[:, 20:]) > 1e-2


def test_ragged_forward_rows_behave_as_if_alone(variant):
    lengths = np.array([SEQ, 23, 9], np.int32)
    ours = variant.ours(variant.padded(lengths, SEQ), lengths)
    for b, n in enumerate(lengths):
        assert max_diff(ours[b, :n], variant.ref[b, :n]) <= TOL, b


def test_prefill_then_decode_matches_full_forward(variant):
    """Row 0: prefill of PROMPT tokens + 8 decode steps; rows 1, 2: shorter, right-padded prompts."""
    cfg, params, ref = variant.cfg, variant.params, variant.ref
    lengths = np.array([PROMPT, 20, 9], np.int32)
    h, cache = variant.prefill(lengths)
    assert cache.capacity == SEQ
    assert cache.k.shape == (cfg.num_layers, BATCH, SEQ, cfg.num_kv_heads, cfg.head_dim)
    assert np.asarray(cache.lengths).tolist() == lengths.tolist()
    prefill_logits = np.asarray(lm.logits(cfg, params, h))
    for b, n in enumerate(lengths):
        assert max_diff(prefill_logits[b, :n], ref[b, :n]) <= TOL, b
    full = variant.ours(variant.tokens)
    rows = np.arange(BATCH)
    for t in range(SEQ - PROMPT):
        step_tokens = jnp.asarray(variant.tokens[rows, lengths + t])
        step_logits, h_t, cache = lm.decode_step(cfg, params, cache, step_tokens)
        assert step_logits.shape == (BATCH, cfg.vocab_size) and h_t.shape == (BATCH, cfg.hidden_size)
        assert max_diff(step_logits, ref[rows, lengths + t]) <= TOL, t
        assert max_diff(step_logits[0], full[0, PROMPT + t]) <= TOL, t
        assert max_diff(lm.logits(cfg, params, h_t), step_logits) == 0.0
    assert np.asarray(cache.lengths).tolist() == (lengths + SEQ - PROMPT).tolist()


@pytest.mark.parametrize("impl", ["xla", "cpu"])  # cpu: the C++ kernel reads the cache in place
def test_extend_with_mixed_new_counts(variant, impl):
    cfg, params, ref = variant.cfg, variant.params, variant.ref
    done = np.array([20, 11, 5], np.int32)
    _, cache = variant.prefill(done)
    rows = np.arange(BATCH)
    for num_new in (np.array([6, 2, 4], np.int32), np.array([0, 5, 1], np.int32)):
        idx = np.minimum(done[:, None] + np.arange(6)[None, :], SEQ - 1)
        chunk = np.where(np.arange(6)[None, :] < num_new[:, None], variant.tokens[rows[:, None], idx],
                         variant.junk[:, :6])
        h, cache = lm.extend(cfg, params, cache, jnp.asarray(chunk), jnp.asarray(num_new), attention_impl=impl)
        got = np.asarray(lm.logits(cfg, params, h))
        for b in rows:
            k = num_new[b]
            assert max_diff(got[b, :k], ref[b, done[b]:done[b] + k]) <= TOL, b
        done = done + num_new
        assert np.asarray(cache.lengths).tolist() == done.tolist()
    step_logits, _, cache = lm.decode_step(cfg, params, cache, jnp.asarray(variant.tokens[rows, done]))
    assert max_diff(step_logits, ref[rows, done]) <= TOL
    # extend without num_new (all rows take every token) continues the same sequences
    h, cache = lm.extend(cfg, params, cache, jnp.asarray(variant.tokens[rows[:, None], done[:, None] + 1
                                                                        + np.arange(6)[None, :]]),
                         attention_impl=impl)
    assert max_diff(lm.logits(cfg, params, h), ref[rows[:, None], done[:, None] + 1 + np.arange(6)]) <= TOL


def test_export_round_trip_equals_hf_state_dict(variant):
    exported = params_to_hf(variant.cfg, variant.params)
    state = {k: v.detach().numpy() for k, v in variant.hf.model.state_dict().items()}
    if variant.cfg.tie_word_embeddings:
        assert np.array_equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        got = np.asarray(exported[key])
        assert got.shape == value.shape and got.dtype == np.float32, key
        assert np.array_equal(got, value), key


# ----------------------------------------------------------------------------- perplexity


def torch_windowed_mean_nll(model, ids, window: int) -> tuple[float, int]:
    """Independent reference: non-overlapping windows, each window's first token is context only."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            w = torch.as_tensor(np.asarray(ids[start:start + window]), dtype=torch.long)
            if len(w) < 2:
                continue
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)
            total -= float(logp.gather(-1, w[1:, None]).double().sum())
            count += len(w) - 1
    return total / count, count


@pytest.fixture(scope="module")
def ppl_model(tiny_hf_model, tmp_path_factory):
    hf = tiny_hf_model("llama", seed=5, num_key_value_heads=2)
    out = tmp_path_factory.mktemp("ppl_model")
    convert(hf.path, out, quiet=True)
    return hf, *load_model(out)[:2]


@pytest.mark.parametrize("n_ids,window,batch_tokens", [
    (150, 32, 4096),  # 4 full windows + a ragged one of 22, one batch
    (97, 32, 64),  # 3 windows + 1 leftover token (scores nothing); batches of 2, the last padded
    (40, 64, 4096),  # a single window shorter than the window size
])
def test_perplexity_matches_torch_windows(ppl_model, n_ids, window, batch_tokens):
    hf, cfg, params = ppl_model
    ids = np.random.default_rng(n_ids).integers(0, cfg.vocab_size, n_ids)
    expected, count = torch_windowed_mean_nll(hf.model, ids, window)
    got = perplexity(cfg, params, ids, window=window, batch_tokens=batch_tokens)
    assert got["tokens"] == count
    assert got["mean_nll"] == pytest.approx(expected, abs=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(expected), rel=1e-5)
