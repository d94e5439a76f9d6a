"""Learning-curve plots from metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("reward/mean", "mean leaf reward"),
    ("reward/accuracy", "leaf accuracy"),
    ("tree/frac_groups_filtered", "groups filtered (std < tau)"),
    ("completions/mean_length", "response tokens"),
    ("loss/policy_loss", "policy loss"),
    ("loss/entropy", "token entropy"),
]


def plot_learning_curve(metrics_path: str | Path, png_path: str | Path) -> None:
    """One panel per stable metric against iterations; silently skips metrics that are absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=False):
        xs = [r["iteration"] for r in rows if key in r]
        ys = [r[key] for r in rows if key in r]
        ax.plot(xs, ys, marker=".", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
