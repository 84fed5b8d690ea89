"""Every shipped config loads, and the paper configs keep the reference's update arithmetic."""

from pathlib import Path

import pytest

from soljax.config import TrainConfig, updates_per_batch
from soljax.config import action_grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_config_loads(path):
    cfg = TrainConfig.load(path)
    action_grid(cfg)


@pytest.mark.parametrize("name, actions, per_batch", [
    ("sol_j_fl_t16", 1560, 1.0),      # 8 x 32 x 16 = 4096 entries: one step per data batch
    ("sol_j_2l_t16", 8, 0.5),         # 2048 entries per batch, 4 minibatches, accum 8: every 2 batches
    ("sol_j_3l_t16", 27, 0.5),
    ("horizon_t4", 336, 0.25),
    ("horizon_t64", 336, 4.0),        # 32 minibatches of 8 episodes, accum 8: 4 steps per batch
    ("llama3b", 1560, 1 / 8),
    ("llama8b_instruct", 1560, 1 / 32),
    ("distil8b_token", 11, 1 / 8),
    ("token_k20", 2, 0.5), ("prune_s40", 2, 0.5), ("quant_q5q10", 2, 0.5),
])
def test_paper_configs_reproduce_the_reference_arithmetic(name, actions, per_batch):
    cfg = TrainConfig.load(CONFIGS / "paper" / f"{name}.yaml")
    assert action_grid(cfg).num_actions == actions
    assert updates_per_batch(cfg) == pytest.approx(per_batch)


def test_default_file_documents_every_key():
    text = (CONFIGS / "default.yaml").read_text()
    keys = {ln.split(":")[0].strip() for ln in text.splitlines() if ln and not ln.startswith("#") and ":" in ln}
    assert keys == set(TrainConfig().to_dict())
    assert TrainConfig.load(CONFIGS / "default.yaml") == TrainConfig()
