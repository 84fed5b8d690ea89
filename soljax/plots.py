"""Pictures people would rather look at than read: training curves and evaluation figures.

Plain functions of metric rows and sweep points (dicts), so training and evaluation both draw with
them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from soljax.compress.actions import AXES


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if len(y) < 3 or width < 2:
        return y
    width = min(width, len(y))
    kernel = np.ones(width) / width
    padded = np.concatenate([np.full(width - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(rows: list[dict], out_path: Path) -> Path | None:
    """Reward, budget penalty, penalized return and per-axis usage gaps over data batches, from a
    run's metric rows (one per batch)."""
    if not rows:
        return None
    plt = _pyplot()
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


# ---------------------------------------------------------------------------------- evaluation

_STYLE = {  # method -> (colour, marker)
    "policy": ("tab:red", "o"), "fixed": ("tab:blue", "s"), "emc": ("tab:green", "^"),
    "dac": ("tab:purple", "v"), "random_mean": ("tab:gray", "x"), "random_best": ("tab:orange", "D"),
}


def pareto_front(points: list[dict], x: str = "net_keep", y: str = "ppl") -> list[dict]:
    """The points not dominated in (``x`` lower, ``y`` lower), by increasing ``x`` (default: net
    keep and perplexity)."""
    pts = sorted(points, key=lambda p: (p[x], p[y]))
    front, best = [], math.inf
    for p in pts:
        if p[y] < best:
            front.append(p)
            best = p[y]
    return front


def _style(method: str):
    key = "random_best" if method.startswith("random_best") else method
    return _STYLE.get(key, ("black", "*"))


def plot_pareto(points: list[dict], out_path: Path, title: str = "", errorbars: bool = True) -> Path:
    """Perplexity vs realized net keep: every method's points, its Pareto front as a line, the
    policy's and fixed baseline's 95% intervals (unless ``errorbars`` is false: many points), dense
    and static single-axis points labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    methods = [m for m in dict.fromkeys(p["method"] for p in points if p["sweep"] is not None)]
    for m in methods:
        pts = [p for p in points if p["method"] == m]
        colour, marker = _style(m)
        x = [p["net_keep"] for p in pts]
        y = [p["ppl"] for p in pts]
        if errorbars and m in ("policy", "fixed"):
            err = np.array([[p["ppl"] - p["ppl_ci"][0] for p in pts], [p["ppl_ci"][1] - p["ppl"] for p in pts]])
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor=colour, alpha=0.35, capsize=2)
        ax.scatter(x, y, color=colour, marker=marker, s=28, alpha=0.55)
        front = pareto_front(pts)
        ax.plot([p["net_keep"] for p in front], [p["ppl"] for p in front], color=colour, marker=marker,
                label=f"{m} (front)")
    for p in points:
        if p["sweep"] is None:
            ax.scatter([p["net_keep"]], [p["ppl"]], color="black", marker="*", s=60)
            ax.annotate(p["method"], (p["net_keep"], p["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("net keep (realized mean of token keep, MLP-input keep, bits / 16)")
    ax.set_ylabel("perplexity over the controlled tokens")
    ax.set_title(title or "quality vs compute at matched realized budgets", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def plot_adherence(points: list[dict], out_path: Path) -> Path:
    """The policy's realized usage against its target, per axis (the diagonal is perfect)."""
    plt = _pyplot()
    pts = [p for p in points if p["method"] == "policy"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    names = {"token": "token keep (kappa)", "prune": "MLP-input keep (rho)", "quant": "bit ratio (bits / 16)"}
    for ax, axis in zip(axes, AXES):
        t = np.array([p["target"][axis] for p in pts])
        u = np.array([p["usage"][axis] for p in pts])
        lo, hi = min(t.min(), u.min(), 0.0), 1.02
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="realized = target")
        ax.fill_between([lo, hi], [lo - 0.02, hi - 0.02], [lo + 0.02, hi + 0.02], color="gray", alpha=0.15,
                        label="0.02 dead zone")
        ax.scatter(t, u, color="tab:red", zorder=3, label="policy")
        gap = np.mean([p["adherence"][axis] for p in pts])
        ax.set_title(f"{names[axis]}\nmean |realized - target| = {gap:.3f}", fontsize=10)
        ax.set_xlabel("target")
        ax.set_ylabel("realized (mean over blocks)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def plot_passage(passage: dict, out_path: Path, max_blocks: int = 3) -> Path:
    """Which tokens got compute: each block's controlled tokens as text, with the policy's token
    keep, MLP-input keep and bit ratio for that step as three coloured strips under each token."""
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    blocks = passage["blocks"][:max_blocks]
    fig, axes = plt.subplots(len(blocks), 1, figsize=(13, 1.9 * len(blocks) + 0.6), squeeze=False)
    for ax, blk in zip(axes[:, 0], blocks):
        toks = blk["tokens"]
        usage = np.asarray(blk["usage"])
        widths = np.array([max(len(t.strip()), 2) for t in toks], float)
        x0 = np.concatenate([[0.0], np.cumsum(widths + 1.0)])[:-1]
        for i, tok in enumerate(toks):
            ax.text(x0[i] + widths[i] / 2, 3.6, tok.replace("\n", "\\n").strip() or "_", ha="center",
                    va="center", fontsize=9, family="monospace")
            for row in range(3):
                ax.add_patch(plt.Rectangle((x0[i], 2 - row), widths[i], 0.85, color=cmap(float(usage[i, row]))))
        for row, axis in enumerate(AXES):
            ax.text(-1, 2.4 - row, axis, ha="right", va="center", fontsize=8)
        ctx = blk["context_tail"].replace("\n", " ")
        ax.set_title(f"... {ctx[-90:]}", fontsize=8, loc="left", color="gray")
        ax.set_xlim(-8, x0[-1] + widths[-1] + 1)
        ax.set_ylim(-0.2, 4.3)
        ax.axis("off")
    t = passage["target"]
    fig.suptitle(f"policy's compute per token (targets: token {t['token']:.2f}, prune {t['prune']:.2f}, "
                 f"quant {t['quant']:.2f}); colour = kept fraction (yellow = full)", fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------ decode timing


def plot_decode_time(rows: list[dict], out_path: Path) -> Path | None:
    """NLL against milliseconds per token (``soljax bench decode`` rows), one panel per context:
    each controlled method's points, its front in time as a line (the points no faster point of
    the method beats in NLL), each point labelled with its net keep; dense as a star."""
    if not rows:
        return None
    plt = _pyplot()
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.4 * len(contexts), 3.6), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        here = [r for r in rows if r["context"] == context]
        for method in sorted({r["method"] for r in here} - {"dense"}):
            pts = [r for r in here if r["method"] == method]
            colour, marker = _STYLE.get(method.split("-")[0], ("tab:gray", "o"))
            ax.scatter([r["ms_per_token"] for r in pts], [r["nll"] for r in pts], color=colour, marker=marker,
                       s=22, alpha=0.45)
            front = pareto_front(pts, "ms_per_token", "nll")
            ax.plot([r["ms_per_token"] for r in front], [r["nll"] for r in front], color=colour, marker=marker,
                    linestyle={"masked": "--", "noreplay": ":"}.get(method.partition("-")[2], "-"), label=method)
            for r in pts:
                ax.annotate(f"{r['net_keep']:.2f}", (r["ms_per_token"], r["nll"]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
        for r in (r for r in here if r["method"] == "dense"):
            ax.scatter([r["ms_per_token"]], [r["nll"]], color="black", marker="*", s=80, label="dense", zorder=3)
        ax.set_title(f"context {context}", fontsize=10)
        ax.set_xlabel("ms per token (batch 1)")
        ax.set_ylabel("NLL of the continuation (nats)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
