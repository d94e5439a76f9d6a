"""Sampled trees on disk (trees/iter_NNNNNN.json) and `treerpo show`: one tree as an HTML page and a PNG.

A user debugging credit assignment looks at a tree before reading numbers: every node's text, its value and
its advantage (docs/algorithm.md s.2-s.3, recomputed with ``tree_advantages`` and the run's settings), the
sibling groups that tau filtered (greyed), and the leaves' rewards. The page is self-contained (inline CSS, no
network assets).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rllib_treerpo.core.advantages import tree_advantages
from rllib_treerpo.learner.rows import PackSettings

SETTINGS = ("tau", "advantage_std", "value_estimate", "advantage_eps")


# How a node is drawn, by its advantage: the page's CSS class and the PNG's dot colour ("": the prompt, or 0).
COLORS = {"filtered": "#999", "pos": "#2a2", "neg": "#c33", "": "#36c"}


def _kind(index: int, advantage: float) -> str:
    """A node's class: "filtered" (its sibling group was dropped: NaN), "pos", "neg", or "" (the prompt, or
    0)."""
    if index == 0:
        return ""
    if not np.isfinite(advantage):
        return "filtered"
    return "pos" if advantage > 0 else "neg" if advantage < 0 else ""


def save_trees(folder: Path, iteration: int, trees: list, config: Any) -> Path:
    """Write ``trees`` (rllib_treerpo.core.tree.Tree) of an iteration with the advantage settings they were
    scored with."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "iteration": iteration,
        "settings": {k: v for k, v in asdict(PackSettings.from_config(config)).items() if k in SETTINGS},
        "trees": [_tree_record(t) for t in trees],
    }
    path = folder / f"iter_{iteration:06d}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(path)
    return path


def _tree_record(tree) -> dict:
    return {
        "prompt": tree.prompt_text,
        "answer": tree.answer,
        "problem_id": tree.problem_id,
        "origin": tree.origin,
        "weights_version": tree.weights_version,
        "nodes": [
            {
                "parent": n.parent,
                "text": n.text,
                "tokens": int(len(n.token_ids)),
                "finish_reason": n.finish_reason,
                "reward": None if n.reward != n.reward else float(n.reward),
            }
            for n in tree.nodes
        ],
    }


def scored(record: dict, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """Values and advantages of a saved tree, recomputed exactly as training computed them."""
    parent = np.array([n["parent"] for n in record["nodes"]], dtype=np.int64)
    reward = np.array([np.nan if n["reward"] is None else n["reward"] for n in record["nodes"]])
    return tree_advantages(
        parent,
        reward,
        advantage_std=settings["advantage_std"],
        tau=settings["tau"],
        value_estimate=settings["value_estimate"],
        eps=settings["advantage_eps"],
    )


def load(run: str | Path, iteration: int | None = None) -> dict:
    """A run's saved trees of ``iteration`` (default: the last saved); one-line errors naming what is
    missing."""
    folder = Path(run) / "trees"
    files = sorted(folder.glob("iter_*.json")) if folder.is_dir() else []
    if not files:
        raise ValueError(
            f"{run}: no saved trees (trees/iter_*.json); `treerpo train` saves them when save_trees > 0"
        )
    if iteration is None:
        return json.loads(files[-1].read_text())
    path = folder / f"iter_{iteration:06d}.json"
    if not path.exists():
        have = [int(f.stem.removeprefix("iter_")) for f in files]
        raise ValueError(
            f"--iteration {iteration}: no trees saved for it in {run}; saved: {have[:5]}"
            f"{' ... ' + str(have[-1]) if len(have) > 5 else ''}"
        )
    return json.loads(path.read_text())


PAGE_STYLE = """body { font-family: sans-serif; margin: 16px; min-width: min-content; }
p { max-width: 90ch; }
pre { margin: 2px 0; white-space: pre-wrap; font-size: 13px; }
.node { border: 1px solid #999; border-radius: 4px; padding: 4px 6px; margin: 4px 0; background: #fff; }
.kids { display: flex; gap: 6px; align-items: flex-start; }
.kids > .node { flex: 1 1 0; }
.leaf { min-width: 11em; }
.head { font-size: 12px; color: #333; }
.pos { background: #e6f4e6; }
.neg { background: #f9e6e6; }
.filtered { background: #eee; color: #888; }
.filtered .head { color: #888; }
"""


def render_html(record: dict, index: int, settings: dict, iteration: int) -> str:
    """The tree as nested boxes: text, value, advantage; filtered groups greyed; leaves with their reward."""
    values, advantages = scored(record, settings)
    children: dict[int, list[int]] = {}
    for i, node in enumerate(record["nodes"][1:], start=1):
        children.setdefault(node["parent"], []).append(i)

    def box(i: int) -> str:
        node = record["nodes"][i]
        adv = advantages[i]
        kind = _kind(i, adv)
        head = (
            f"value {values[i]:.2f}"
            + (f" · adv {adv:+.2f}" if np.isfinite(adv) else " · filtered (group std < tau)" if i else "")
            + (f" · reward {node['reward']:.2f}" if node["reward"] is not None else "")
        )
        text = html.escape(record["prompt"] if i == 0 else node["text"]) or "<i>(empty)</i>"
        kids = "".join(box(c) for c in children.get(i, []))
        label = "prompt" if i == 0 else f"node {i}"
        return (
            f'<div class="node {kind}{"" if kids else " leaf"}"><div class="head">{label} · {head}</div>'
            f"<pre>{text}</pre>{f'<div class=kids>{kids}</div>' if kids else ''}</div>"
        )

    title = f"tree {index} of iteration {iteration} · answer {html.escape(str(record['answer']))}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
{PAGE_STYLE}</style></head><body><h3>{title}</h3><p>settings: {html.escape(json.dumps(settings))} · adv: the
node's advantage (its step's tokens) · green: positive, red: negative, grey: filtered sibling group</p>
{box(0)}</body></html>"""


def render_png(record: dict, index: int, settings: dict, iteration: int, path: Path) -> None:
    """The tree drawn level by level: a dot per node coloured by advantage, value and reward beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, advantages = scored(record, settings)
    children: dict[int, list[int]] = {}
    depth = {0: 0}
    for i, node in enumerate(record["nodes"][1:], start=1):
        children.setdefault(node["parent"], []).append(i)
        depth[i] = depth[node["parent"]] + 1
    xs: dict[int, float] = {}
    leaves = [0]

    def place(i: int) -> None:  # leaves evenly left to right (depth-first), a parent over its children
        for c in children.get(i, []):
            place(c)
        if i in children:
            xs[i] = sum(xs[c] for c in children[i]) / len(children[i])
        else:
            xs[i] = leaves[0]
            leaves[0] += 1

    place(0)
    width = max(leaves[0], 1)
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * width, 40), 2 + 1.2 * (max(depth.values()) + 1)))
    for i, node in enumerate(record["nodes"][1:], start=1):
        ax.plot(
            [xs[node["parent"]], xs[i]], [-depth[node["parent"]], -depth[i]], color="#bbb", lw=0.8, zorder=1
        )
    for i in xs:
        adv = advantages[i]
        color = COLORS[_kind(i, adv)]
        ax.scatter([xs[i]], [-depth[i]], s=60, color=color, zorder=2)
        label = f"{values[i]:.2f}" + (
            "" if record["nodes"][i]["reward"] is None else f"\nr={record['nodes'][i]['reward']:.0f}"
        )
        ax.annotate(
            label, (xs[i], -depth[i]), textcoords="offset points", xytext=(0, -18), ha="center", fontsize=7
        )
    ax.set_title(
        f"tree {index}, iteration {iteration}: node value (green +, red - advantage, grey filtered)",
        fontsize=10,
    )
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(
    run: str | Path, iteration: int | None = None, tree: int = 0, output: str | Path | None = None
) -> Path:
    """`treerpo show`: write tree ``tree`` of a run's saved iteration as HTML and PNG; returns the HTML
    path."""
    saved = load(run, iteration)
    if not 0 <= tree < len(saved["trees"]):
        raise ValueError(f"--tree {tree}: iteration {saved['iteration']} saved {len(saved['trees'])} tree(s)")
    out = Path(output) if output is not None else Path(run) / "show"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"iter_{saved['iteration']:06d}_tree{tree}"
    record, settings = saved["trees"][tree], saved["settings"]
    stem.with_suffix(".html").write_text(render_html(record, tree, settings, saved["iteration"]))
    render_png(record, tree, settings, saved["iteration"], stem.with_suffix(".png"))
    return stem.with_suffix(".html")
