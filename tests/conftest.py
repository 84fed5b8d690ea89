"""Shared test setup: offline, CPU-only JAX, tiny Hugging Face models, the embedded model.

Fixtures:

- ``tiny_lm(seed, scale, **overrides)`` (a function): ``(LMConfig, params)`` of a tiny random soljax LM;
  ``write_policy_run(run_dir, train_cfg, policy_vars)``: a run directory with one policy checkpoint.
- ``word_tokenizer_json``: ``make(vocab_size) -> str``, a ``tokenizers`` JSON with that many words.
- ``tiny_hf_model``: a factory ``make(arch, **options) -> TinyHF`` that builds a tiny random
  ``transformers`` model (fp32, eager attention) with enlarged random weights, saves it as a Hugging
  Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) and returns the
  directory together with the live torch model. Needs torch: tests using it skip without it, and
  fail under ``SOLJAX_REQUIRE_ASSETS=1`` (so does any missing extra, see :func:`require`).
- ``embedded_model``: ``(cfg, params, tokenizer)`` of the converted embedded SmolLM2 model. Skips
  when the GGUF is not in the cache, unless ``SOLJAX_REQUIRE_ASSETS=1`` (then it fails).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests check numbers, not speed, and compiling dominates the suite: XLA's LLVM optimizations
# off (its own graph passes still run, so programs keep their structure and fusions) cut the suite's
# time by about a tenth. The golden agreement tests pass at this level as at the default one (it is
# one more CPU code generation, like the ones the bounds were derived over). Subprocesses inherit
# it; the demo and notebook tests remove it (they run as a user runs them).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REQUIRE_ASSETS = os.environ.get("SOLJAX_REQUIRE_ASSETS") == "1"


# `make test` runs the suite on two workers, one module at a time each (pytest-xdist, `--dist
# loadfile --no-loadscope-reorder`). Modules go out in collection order, so the longest ones
# (minutes each on 2 cores, most of it compiling; measured with `--durations`) are collected first
# and the short ones fill in behind them: both workers then finish at about the same time.
LONGEST_FIRST = (
    "train/test_train.py", "tools/test_notebooks.py", "train/test_paper_configs.py", "serve/test_generate.py",
    "tools/test_demo.py", "train/test_parallel.py", "eval/test_harness.py", "eval/test_sharded_eval.py",
    "eval/test_evaluate.py", "engine/test_controlled.py", "engine/test_golden_rollouts.py",
    "lm/test_fast_step_embedded.py", "control/test_policy.py", "eval/test_protocol.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    here = Path(__file__).parent

    def key(item):
        return rank.get(Path(item.fspath).relative_to(here).as_posix(), len(rank))

    items.sort(key=key)  # stable: every module keeps its own tests' order, the rest their order


def skip_or_fail(message: str):
    """Skips the test, or fails it when ``SOLJAX_REQUIRE_ASSETS=1`` (assets must be present)."""
    if REQUIRE_ASSETS:
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def require(module: str):
    """Imports and returns an optional dependency: skips the test without it, or fails it when
    ``SOLJAX_REQUIRE_ASSETS=1`` (the test command installs every extra)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        skip_or_fail(f"{module} is not installed ({e})")


def worker_output(proc, timeout_s: float) -> list[dict]:
    """The JSON lines a worker subprocess printed (killed after ``timeout_s``); fails with its stderr."""
    import subprocess

    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-4000:]}"
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


def require_torch():
    """Imports and returns torch, and checks transformers (see :func:`require`)."""
    torch = require("torch")
    require("transformers")
    return torch


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA:CPU executable keeps memory
    mappings, and the whole suite compiles enough programs to pass the kernel's per-process limit
    (``vm.max_map_count``, 65530 by default), where the next compilation crashes."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


# ----------------------------------------------------------------------------- tiny soljax LMs

TINY_LM = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8)


def tiny_lm(seed: int = 0, scale: float = 0.3, **overrides):
    """``(LMConfig, params)`` of a tiny random soljax LM (GQA, 2 layers; ``overrides`` are config fields)."""
    import jax

    from soljax.lm import LMConfig, init_params

    cfg = LMConfig(**{**TINY_LM, **overrides})
    return cfg, init_params(cfg, jax.random.PRNGKey(seed), scale=scale)


def write_policy_run(run_dir, train_cfg, policy_vars) -> None:
    """A training run directory holding ``train_cfg`` and one checkpoint (batch 1) whose policy is
    ``policy_vars``; the rest of the training state is minimal (a run's users read only the policy)."""
    import jax
    import jax.numpy as jnp

    from soljax.train import Buffer, RunWriter, TrainState

    writer = RunWriter(run_dir, train_cfg)
    writer.start_fresh()
    zero = jnp.zeros((), jnp.int32)
    writer.save(TrainState(policy=policy_vars, ref={}, opt={}, grad_acc={}, accum=zero, buffer=Buffer.zeros(1, 1, 1, 1),
                           fill=zero, batch=zero + 1, updates=zero, key=jax.random.PRNGKey(0)))
    writer.close()


# ----------------------------------------------------------------------------- tiny HF models


def make_tokenizer_json(vocab_size: int) -> str:
    """A word-level tokenizer with exactly ``vocab_size`` entries (``<unk>``, then ``w1``, ``w2``...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    assert tok.get_vocab_size() == vocab_size
    return tok.to_str()


@pytest.fixture(scope="session")
def word_tokenizer_json():
    """The builder ``make_tokenizer_json(vocab_size) -> str`` (no torch needed)."""
    return make_tokenizer_json


@dataclasses.dataclass
class TinyHF:
    """A saved tiny HF model: ``path`` (the HF directory), ``model`` (torch, eval, fp32, eager)."""

    path: Path
    model: object
    hf_config: dict

    def logits(self, ids) -> np.ndarray:
        """transformers' fp32 logits ``[B, T, V]`` (numpy) of full unpadded sequences ``ids``."""
        import torch

        with torch.no_grad():
            out = self.model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits
        return out.float().numpy()


TINY_DEFAULTS = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     rms_norm_eps=1e-5)


def build_tiny_hf(out: Path, arch: str = "llama", *, seed: int = 0, weight_std: float = 0.15,
                  **overrides) -> TinyHF:
    """Builds a tiny random ``arch`` model (llama / qwen2 / qwen3), saves it to ``out``.

    ``overrides`` are config fields (``tie_word_embeddings``, ``rope_parameters``, ``head_dim``,
    ``attention_bias``...). Every weight is redrawn: matrices and biases ~ N(0, weight_std), norm
    scales ~ 1 + N(0, 0.3), embeddings ~ N(0, 1), so layout or numerics bugs change the logits a lot.
    """
    torch = require_torch()
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[arch]
    kwargs = {**TINY_DEFAULTS, "initializer_range": weight_std, **overrides}
    if arch != "llama":
        kwargs.setdefault("use_sliding_window", False)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=gen))
    model.eval()
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(make_tokenizer_json(config.vocab_size), encoding="utf-8")
    return TinyHF(path=out, model=model, hf_config=json.loads((out / "config.json").read_text()))


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """Factory fixture: ``tiny_hf_model(arch="llama", **options) -> TinyHF`` (see build_tiny_hf)."""
    counter = iter(range(10**6))

    def make(arch: str = "llama", **options) -> TinyHF:
        out = tmp_path_factory.mktemp(f"hf_{arch}_{next(counter)}")
        return build_tiny_hf(out, arch, **options)

    return make


# ----------------------------------------------------------------------------- embedded model


def embedded_gguf_path() -> Path:
    from soljax.data import assets

    return assets._installed_gguf() or assets.gguf_cache_path()


@pytest.fixture(scope="session")
def embedded_model():
    """``(cfg, params, tokenizer)`` of the embedded SmolLM2-135M-Instruct, converted once (fp32)."""
    gguf = embedded_gguf_path()
    if not gguf.is_file():
        skip_or_fail(f"embedded model not fetched ({gguf} is missing; run "
                     "soljax.data.assets.ensure_assets())")
    from soljax.data.embedded import ensure_embedded_model
    from soljax.lm.checkpoint import load_model

    return load_model(ensure_embedded_model())
