"""The paper's configs (configs/paper/*.yaml) on 1, 2 and 8 simulated devices, unchanged.

Mesh inference: ``mesh_data``/``mesh_model`` left at 0 put the largest divisor of the device count
that divides ``batch_size`` on ``data`` and the rest on ``model``, so every paper batch size fits
every device count (unit tests below, no devices needed).

The runs (tests/train/paper_worker.py, one subprocess per device count, all started together):
paper configs on 8, 1 and 2 simulated CPU devices, each unchanged apart from ``model=`` (a tiny
random Llama stand-in of the config's family: tied embeddings and Llama-3 RoPE for Llama 3.2,
untied for the 8B models) and ``max_batches`` (up to the end of the first learning pass), then
checkpointed and resumed. Each config costs 70-100 s of CPU on 8 simulated devices (30-40 s on
one), nearly all of it compiling its training programs (the configs differ in shapes and
constants, so nothing is shared; the resumed run reads them from a compilation cache), so by
default the suite runs the batch-2 8B config that the old all-on-``data`` mesh refused on 8 devices
(a 2 x 4 mesh: KV heads and vocabulary stay replicated over a model axis of 4; the 4 x 2 case is
tests/train/test_parallel.py's), the same config on 2 devices and a batch-8 1B config whose first
batch ends in an optimizer update on 1 device.
``SOLJAX_PAPER_CONFIGS=all`` runs every paper config on 8 devices and three configs on 1 and 2.

The configs' data key (``hf:allenai/dolma:v1_6-sample:train:text``) needs the network. The worker
substitutes the document source in-process: ``datasets.load_dataset`` (the call through which
soljax.data.blocks reads every Hugging Face source) serves that dataset from synthetic documents
in the stand-ins' word vocabulary; everything after it (tokenization, token cache, blocks) is
soljax's own. The configs themselves are not edited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import worker_output
from soljax import parallel
from soljax.config import TrainConfig
from soljax.errors import SoljaxError

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
EVERY = os.environ.get("SOLJAX_PAPER_CONFIGS") == "all"
# device count -> the configs it runs (see the module docstring)
SOME = ["llama8b_instruct", "llama3b", "sol_j_fl_t16"]
RUNS = ({8: [p.stem for p in PAPER], 1: SOME, 2: SOME} if EVERY
        else {8: ["llama8b_instruct"], 1: ["sol_j_fl_t16"], 2: ["llama8b_instruct"]})
TIMEOUT_S = 7200 if EVERY else 3600  # generous: the first compiles are slow on a loaded machine
# Stand-in dims chosen so the model-axis rules meet both cases on the meshes that result (model
# axis 2 for batch 4, 4 for batch 2 on 8 devices): 4 query heads and 24 MLP channels split over
# 2 and 4; 2 KV heads and a 98-word vocabulary split over 2 but stay replicated over 4.
STANDIN = dict(arch="llama", vocab_size=98, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=4,
               num_kv_heads=2, head_dim=4, max_position_embeddings=2048, rope_theta=500000.0)


# ----------------------------------------------------------------------------------------------
# Mesh inference (no devices needed)


@pytest.mark.parametrize("batch, devices, shape", [
    (8, 1, (1, 1)), (8, 2, (2, 1)), (8, 4, (4, 1)), (8, 8, (8, 1)),
    (4, 1, (1, 1)), (4, 2, (2, 1)), (4, 4, (4, 1)), (4, 8, (4, 2)),
    (2, 1, (1, 1)), (2, 2, (2, 1)), (2, 4, (2, 2)), (2, 8, (2, 4)),
    (6, 8, (2, 4)), (3, 8, (1, 8)),
])
def test_default_mesh_fits_the_batch(batch, devices, shape):
    cfg = TrainConfig.load(None, [f"batch_size={batch}"])
    assert (cfg.mesh_data, cfg.mesh_model) == (0, 0)
    assert parallel.mesh_shape(cfg.mesh_data, cfg.mesh_model, devices, cfg.batch_size) == shape


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_every_paper_config_gets_a_mesh_on_1_2_4_8_devices(path):
    cfg = TrainConfig.load(path)
    for n in (1, 2, 4, 8):
        data, model = parallel.mesh_shape(cfg.mesh_data, cfg.mesh_model, n, cfg.batch_size)
        assert data * model == n and cfg.batch_size % data == 0
        assert not any(n % d == 0 and cfg.batch_size % d == 0 for d in range(data + 1, n + 1))  # the largest


@pytest.mark.parametrize("data, model, batch, devices, shape", [
    (0, 1, 4, 8, (4, 1)),  # model fixed at 1: data parallel on as many devices as the batch can use
    (0, 2, 2, 8, (2, 2)), (0, 2, 8, 8, (4, 2)), (2, 0, 4, 8, (2, 4)), (4, 2, 8, 8, (4, 2)), (1, 1, 8, 8, (1, 1)),
])
def test_explicit_axes_keep_working(data, model, batch, devices, shape):
    assert parallel.mesh_shape(data, model, devices, batch) == shape


@pytest.mark.parametrize("overrides, devices, needle", [
    (["mesh_model=3", "batch_size=4"], 8, "mesh_model=3 does not divide the 8 devices"),
    (["mesh_data=2", "mesh_model=8", "batch_size=4"], 8, "needs more than the 8 devices available"),
    (["mesh_model=16", "batch_size=4"], 8, "mesh_model=16 does not divide the 8 devices"),
])
def test_impossible_explicit_axes_give_one_line(overrides, devices, needle):
    cfg = TrainConfig.load(None, overrides)
    with pytest.raises(SoljaxError, match=needle) as e:
        parallel.make_mesh(cfg, jax.devices()[:1] * devices)  # only the count matters before the mesh is made
    assert "\n" not in str(e.value)


def test_standin_dims_meet_both_model_axis_rules():
    P = jax.sharding.PartitionSpec
    L, D, H, Hkv, Dh, F, V = (STANDIN[k] for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                     "head_dim", "intermediate_size", "vocab_size"))
    for model in (2, 4):
        assert parallel.lm_param_spec("wq", (L, D, H, Dh), model) == P(None, None, "model")
        assert parallel.lm_param_spec("w_up", (L, D, F), model) == P(None, None, "model")
    assert parallel.lm_param_spec("wk", (L, D, Hkv, Dh), 2) == P(None, None, "model")
    assert parallel.lm_param_spec("wk", (L, D, Hkv, Dh), 4) == P()
    assert parallel.lm_param_spec("embed", (V, D), 2) == P("model")
    assert parallel.lm_param_spec("embed", (V, D), 4) == P()


# ----------------------------------------------------------------------------------------------
# The runs


def write_standins(out: Path) -> dict[str, str]:
    """Tiny random Llama stand-ins (soljax model directories) for every model the paper configs
    name; returns ``{model id: directory}``."""
    from conftest import make_tokenizer_json
    from soljax.lm import LMConfig
    from soljax.lm.checkpoint import params_from_numpy, save_model
    from soljax.lm.config import RopeScaling
    from soljax.lm.params import param_shapes
    from soljax.lm.tokenizer import Tokenizer

    tok = Tokenizer(make_tokenizer_json(STANDIN["vocab_size"]))
    families = {  # Llama 3.2 ties its embeddings; Llama 3.1 8B (and the R1 distill of it) does not
        "llama3.2": LMConfig(**STANDIN, tie_word_embeddings=True, rope_scaling=RopeScaling(
            rope_type="llama3", factor=32.0, original_max_position_embeddings=1024)),
        "llama3.1": LMConfig(**STANDIN, rope_scaling=RopeScaling(rope_type="llama3", factor=8.0,
                                                                 original_max_position_embeddings=1024)),
    }
    rng = np.random.default_rng(0)
    for name, cfg in families.items():
        tree = jax.tree_util.tree_map_with_path(
            lambda path, shape: (1.0 + 0.1 * rng.standard_normal(shape) if "norm" in jax.tree_util.keystr(path)
                                 else 0.3 * rng.standard_normal(shape)).astype(np.float32),
            param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
        save_model(out / name, cfg, params_from_numpy(cfg, tree), tok)
    models = {TrainConfig.load(p).model for p in PAPER}
    assert all(m.startswith(("meta-llama/Llama-3", "deepseek-ai/DeepSeek-R1-Distill-Llama")) for m in models), models
    return {m: str(out / ("llama3.2" if "Llama-3.2" in m else "llama3.1")) for m in models}


def _spawn(out: Path, standins: dict, devices: int, names: list[str]) -> subprocess.Popen:
    out.mkdir(parents=True)
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, SOLJAX_CACHE_DIR=str(out / "cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(Path(__file__).parent / "paper_worker.py"), str(out),
                             json.dumps(standins), str(devices), *names], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _finish(proc: subprocess.Popen) -> dict[str, dict]:
    return {r["config"]: r for r in worker_output(proc, TIMEOUT_S)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    standins = write_standins(root / "standins")
    procs = {n: _spawn(root / f"devices{n}", standins, n, names) for n, names in RUNS.items()}
    return {n: _finish(p) for n, p in procs.items()}


def _expected_mesh(batch: int, devices: int):
    if devices == 1:
        return None
    data = max(d for d in range(1, devices + 1) if devices % d == 0 and batch % d == 0)
    return [data, devices // data]


@pytest.mark.parametrize("devices", [8, 1, 2])
def test_paper_configs_train_checkpoint_and_resume(runs, devices):
    """Each config ran to the end of its first learning pass, checkpointed and resumed for one more
    batch (checked in the worker); here: the meshes and where the LM's weights went."""
    got = runs[devices]
    assert sorted(got) == sorted(RUNS[devices])
    for name, r in got.items():
        cfg = TrainConfig.load(ROOT / "configs" / "paper" / f"{name}.yaml")
        mesh = _expected_mesh(cfg.batch_size, devices)
        assert r["mesh"] == mesh, name
        model = 1 if mesh is None else mesh[1]
        (wq, wq_shard), (embed, embed_shard) = r["wq"], r["embed"]
        assert wq_shard == wq[:2] + [wq[2] // model, wq[3]], name  # heads split over `model`
        assert embed_shard == (embed if embed[0] % model else [embed[0] // model, embed[1]]), name
