"""Trees -> advantages -> training rows (SPEC.md s.3, s.4), plus the tree/* and reward/* metrics. Pure numpy.

The one place where a batch of sampled trees becomes learner input; the algorithm and the benchmarks call it.
"""

from __future__ import annotations

import numpy as np

from rllib_treerpo.advantages import tree_advantages, tree_stats
from rllib_treerpo.tree import Tree


def build_training_batch(
    trees: list[Tree],
    *,
    tau: float,
    advantage_std: str,
    value_estimate: str,
    eps: float = 1e-6,
    pad_id: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Advantages for every tree (SPEC.md s.3) flattened to rows (s.4), and metrics of the batch."""
    advantages, groups, kept = [], 0.0, 0.0
    leaf_rewards, leaf_lengths, depths = [], [], []
    for tree in trees:
        parent = tree.parent_array()
        _, adv = tree_advantages(
            parent,
            tree.leaf_rewards(),
            advantage_std=advantage_std,
            tau=tau,
            value_estimate=value_estimate,
            eps=eps,
        )
        advantages.append(adv)
        stats = tree_stats(parent, adv)
        groups += stats["groups"]
        kept += stats["groups_kept"]
        for leaf in tree.leaves():
            leaf_rewards.append(tree.nodes[leaf].reward)
            leaf_lengths.append(sum(len(tree.nodes[i].token_ids) for i in tree.path(leaf)))
            depths.append(tree.nodes[leaf].depth)
    rows = flatten_trees(trees, advantages, pad_id=pad_id)
    rewards = np.asarray(leaf_rewards, dtype=np.float64)
    metrics = {
        "tree/trees": float(len(trees)),
        "tree/nodes": float(sum(len(t.nodes) - 1 for t in trees)),
        "tree/leaves": float(len(rewards)),
        "tree/leaf_depth_mean": float(np.mean(depths)) if depths else 0.0,
        "tree/groups": groups,
        "tree/frac_groups_filtered": 1.0 - kept / groups if groups else 0.0,
        "tree/generated_tokens": float(sum(t.num_step_tokens() for t in trees)),
        "tree/train_rows": float(len(rows["input_ids"])),
        "tree/train_tokens": float(rows["loss_mask"].sum()),
        "reward/mean": float(rewards.mean()) if len(rewards) else 0.0,
        # A leaf is correct when its reward is (numerically) full: the verifier accepted the answer.
        "reward/accuracy": float(np.mean(rewards >= 1.0 - 1e-9)) if len(rewards) else 0.0,
        "reward/frac_trees_all_wrong": float(np.mean([np.nanmax(t.leaf_rewards()) <= 0 for t in trees]))
        if trees
        else 0.0,
        "completions/mean_length": float(np.mean(leaf_lengths)) if leaf_lengths else 0.0,
    }
    return rows, metrics


def flatten_trees(
    trees: list[Tree], advantages: list[np.ndarray], *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Training rows: one per node with a finite advantage (SPEC.md s.4).

    Row of node c: ``input_ids = path_ids(parent(c)) ++ tokens(c)``; only c's tokens carry loss. Nodes whose
    group was filtered (NaN advantage) and the root yield no row, so each generated token is trained at most once.

    Returns right-padded arrays, B rows by T = longest row:
      input_ids (B, T) int64, attention_mask (B, T) int64,
      loss_mask (B, T) float32   1 at c's target tokens,
      advantages (B, T) float32  A(c) at target tokens, 0 elsewhere,
      old_logprobs (B, T) float32  sampling log-prob of token t at position t (0 where loss_mask is 0),
      tree_index (B,), node_index (B,) int64: where each row came from.
    Position t's log-prob is predicted by the logits at t - 1; the learner shifts.
    """
    if len(trees) != len(advantages):
        raise ValueError(f"{len(trees)} trees but {len(advantages)} advantage arrays")
    rows = []
    for t, (tree, adv) in enumerate(zip(trees, advantages, strict=True)):
        adv = np.asarray(adv, dtype=np.float64)
        if adv.shape != (len(tree.nodes),):
            raise ValueError(f"tree {t}: advantages shape {adv.shape}, expected ({len(tree.nodes)},)")
        for i in range(1, len(tree.nodes)):
            node = tree.nodes[i]
            if not np.isfinite(adv[i]) or len(node.token_ids) == 0:
                continue
            context = tree.path_ids(node.parent)
            rows.append((t, i, context, node.token_ids, node.logprobs, adv[i]))

    width = max((len(c) + len(x) for _, _, c, x, _, _ in rows), default=0)
    b = len(rows)
    out = {
        "input_ids": np.full((b, width), pad_id, np.int64),
        "attention_mask": np.zeros((b, width), np.int64),
        "loss_mask": np.zeros((b, width), np.float32),
        "advantages": np.zeros((b, width), np.float32),
        "old_logprobs": np.zeros((b, width), np.float32),
        "tree_index": np.zeros(b, np.int64),
        "node_index": np.zeros(b, np.int64),
    }
    for r, (t, i, context, target, logprobs, a) in enumerate(rows):
        c, n = len(context), len(target)
        out["input_ids"][r, :c] = context
        out["input_ids"][r, c : c + n] = target
        out["attention_mask"][r, : c + n] = 1
        out["loss_mask"][r, c : c + n] = 1.0
        out["advantages"][r, c : c + n] = a
        out["old_logprobs"][r, c : c + n] = logprobs
        out["tree_index"][r], out["node_index"][r] = t, i
    return out
