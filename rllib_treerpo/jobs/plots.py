"""learning_curve.png from metrics.jsonl (matplotlib, headless): one panel per distinct metric.

First the held-out numbers measured along training (``eval/*``: pass@1 at the training temperature and greedy
accuracy, the value before training marked as a dashed line), then the train reward (raw and smoothed; its
accuracy is the same number for 0/1 rewards and gets no panel of its own), filtered groups, response length,
optimizer steps, the policy loss and the entropy. A panel without data is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("eval/pass@1", "held-out pass@1 (sampled)"),
    ("eval/greedy_accuracy", "held-out greedy accuracy"),
    ("reward/mean", "train reward (mean leaf reward)"),
    ("reward/accuracy", "train leaf accuracy"),
    ("tree/frac_groups_filtered", "groups filtered (std < tau)"),
    ("completions/mean_length", "response tokens"),
    ("loss/optimizer_steps", "optimizer steps"),
    ("loss/policy_loss", "policy loss"),
    ("loss/entropy", "token entropy"),
]
SMOOTH = 0.8  # exponential moving average of noisy per-iteration metrics


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _smooth(ys: list[float]) -> list[float]:
    out, value = [], None
    for y in ys:
        value = y if value is None else SMOOTH * value + (1 - SMOOTH) * y
        out.append(value)
    return out


def panels(rows: list[dict]) -> list[tuple[str, str]]:
    """The panels with data; train accuracy only when it differs from the mean reward (non-binary rewards)."""
    out = [(k, t) for k, t in PANELS if _series(rows, k)[0]]
    same = all(r.get("reward/accuracy") == r.get("reward/mean") for r in rows)
    return [(k, t) for k, t in out if not (k == "reward/accuracy" and same)]


def plot_learning_curve(metrics_path: str | Path, png_path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    chosen = panels(rows)
    if not chosen:
        return
    cols = 3
    fig, axes = plt.subplots(
        (len(chosen) + cols - 1) // cols, cols, figsize=(12, 3.2 * ((len(chosen) + 2) // 3)), squeeze=False
    )
    for ax, (key, title) in zip(axes.flat, chosen, strict=False):
        xs, ys = _series(rows, key)
        if key.startswith("eval/"):
            ax.plot(xs, ys, marker="o", lw=1.5)
            if xs and xs[0] == 0:
                ax.axhline(ys[0], ls="--", color="grey", lw=1, label=f"before training {ys[0]:.3f}")
                ax.legend(fontsize=8)
        else:
            ax.plot(xs, ys, lw=0.8, alpha=0.35, color="C0")
            ax.plot(xs, _smooth(ys), lw=1.6, color="C0", label="smoothed")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.rename(png_path)
