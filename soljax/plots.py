"""Pictures people would rather look at than read: training curves (more come with evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if len(y) < 3 or width < 2:
        return y
    width = min(width, len(y))
    kernel = np.ones(width) / width
    padded = np.concatenate([np.full(width - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def plot_training(metrics_path: Path, out_path: Path) -> Path | None:
    """Reward, budget penalty, penalized return and per-axis usage gaps over data batches."""
    from soljax.train_io import read_metrics

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([r["batch"] for r in rows])
    width = max(1, len(rows) // 25)
    panels = [
        ("reward (mean log p or KL reward)", ["reward_mean"]),
        ("budget penalty", ["penalty_mean"]),
        ("penalized return", ["penalized_return_mean"]),
        ("|usage - target| per axis", ["gap_token", "gap_prune", "gap_quant"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            if k not in rows[0]:
                continue
            y = np.array([r.get(k, np.nan) for r in rows], float)
            (raw,) = ax.plot(x, y, alpha=0.25)
            ax.plot(x, _smooth(y, width), color=raw.get_color(), label=k.replace("gap_", ""))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("data batch")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
