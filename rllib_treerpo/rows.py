"""Trees -> advantages -> training packs (SPEC.md s.3, s.4), plus the tree/* and reward/* metrics. Pure numpy.

The one place where a batch of sampled trees becomes learner input; the algorithm and the benchmarks call it.
"""

from __future__ import annotations

import numpy as np

from rllib_treerpo.advantages import tree_advantages, tree_stats
from rllib_treerpo.packing import Pack, pack_trees
from rllib_treerpo.tree import Tree


def build_training_batch(
    trees: list[Tree],
    *,
    tau: float,
    advantage_std: str,
    value_estimate: str,
    eps: float = 1e-6,
    layout: str = "packed",
    pack_tokens: int = 8192,
) -> tuple[list[Pack], dict[str, float]]:
    """Advantages for every tree (SPEC.md s.3) laid out as training packs (s.4, packing.py), and the metrics."""
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
    packs = pack_trees(trees, advantages, layout=layout, pack_tokens=pack_tokens)
    rewards = np.asarray(leaf_rewards, dtype=np.float64)
    metrics = {
        "tree/trees": float(len(trees)),
        "tree/nodes": float(sum(len(t.nodes) - 1 for t in trees)),
        "tree/leaves": float(len(rewards)),
        "tree/leaf_depth_mean": float(np.mean(depths)) if depths else 0.0,
        "tree/groups": groups,
        "tree/frac_groups_filtered": 1.0 - kept / groups if groups else 0.0,
        "tree/generated_tokens": float(sum(t.num_step_tokens() for t in trees)),
        "tree/train_packs": float(len(packs)),
        "tree/train_tokens": float(sum(p.loss_tokens for p in packs)),
        "tree/packed_tokens": float(sum(len(p.input_ids) for p in packs)),
        "reward/mean": float(rewards.mean()) if len(rewards) else 0.0,
        "reward/std": float(rewards.std()) if len(rewards) else 0.0,  # 0: no learning signal at all
        # A leaf is correct when its reward is (numerically) full: the verifier accepted the answer.
        "reward/accuracy": float(np.mean(rewards >= 1.0 - 1e-9)) if len(rewards) else 0.0,
        "reward/frac_trees_all_wrong": float(np.mean([np.nanmax(t.leaf_rewards()) <= 0 for t in trees]))
        if trees
        else 0.0,
        "completions/mean_length": float(np.mean(leaf_lengths)) if leaf_lengths else 0.0,
    }
    return packs, metrics
