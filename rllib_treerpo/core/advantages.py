"""Leaf rewards -> node values -> step-group advantages (docs/algorithm.md s.2, s.3). Pure numpy.

A tree is given as a parent array: ``parent[i]`` is node i's parent, -1 for the root (node 0), and parents
come before children. The children of one parent form a step-level group; a group whose value std (ddof=1) is
below ``tau`` is dropped, and so is a group of one node. With a depth-1 tree and tau=0 this is exactly GRPO.
"""

from __future__ import annotations

import numpy as np

ADVANTAGE_STD = ("group", "tree", "none")
VALUE_ESTIMATES = ("child_mean", "leaf_mean")


def _check_parent(parent: np.ndarray) -> None:
    if parent.ndim != 1 or len(parent) == 0:
        raise ValueError(f"parent must be a non-empty 1-d array, got shape {parent.shape}")
    if parent[0] != -1:
        raise ValueError(f"parent[0] must be -1 (node 0 is the root), got {parent[0]}")
    idx = np.arange(len(parent))
    bad = np.nonzero((parent[1:] < 0) | (parent[1:] >= idx[1:]))[0]
    if len(bad):
        i = int(bad[0]) + 1
        raise ValueError(
            f"parent[{i}] = {parent[i]}: every non-root node needs a parent with a smaller index"
        )


def node_values(parent, leaf_reward, *, value_estimate: str = "child_mean") -> np.ndarray:
    """(n,) float64 values: the leaf reward at leaves; bottom-up estimates above them (docs/algorithm.md s.2).

    ``child_mean``: V(v) = mean of V over v's children. ``leaf_mean``: mean reward of all leaves below v.
    """
    parent = np.asarray(parent, dtype=np.int64)
    leaf_reward = np.asarray(leaf_reward, dtype=np.float64)
    _check_parent(parent)
    if leaf_reward.shape != parent.shape:
        raise ValueError(f"leaf_reward shape {leaf_reward.shape} differs from parent shape {parent.shape}")
    if value_estimate not in VALUE_ESTIMATES:
        raise ValueError(f"value_estimate={value_estimate!r}; expected one of {VALUE_ESTIMATES}")
    n = len(parent)
    num_children = np.bincount(parent[1:], minlength=n)
    is_leaf = num_children == 0
    if not np.all(np.isfinite(leaf_reward[is_leaf])):
        i = int(np.nonzero(is_leaf & ~np.isfinite(leaf_reward))[0][0])
        raise ValueError(f"leaf_reward[{i}] = {leaf_reward[i]}: every leaf needs a finite reward")

    if value_estimate == "child_mean":
        child_sum = np.zeros(n)
        values = np.where(is_leaf, leaf_reward, 0.0)
        for i in range(n - 1, 0, -1):  # children have larger indices: reverse order is bottom-up
            if not is_leaf[i]:
                values[i] = child_sum[i] / num_children[i]
            child_sum[parent[i]] += values[i]
        if not is_leaf[0]:
            values[0] = child_sum[0] / num_children[0]
        return values

    leaf_sum = np.where(is_leaf, leaf_reward, 0.0)
    leaf_count = is_leaf.astype(np.float64)
    for i in range(n - 1, 0, -1):
        leaf_sum[parent[i]] += leaf_sum[i]
        leaf_count[parent[i]] += leaf_count[i]
    return leaf_sum / leaf_count


def tree_advantages(
    parent,
    leaf_reward,
    *,
    advantage_std: str = "group",
    tau: float = 0.1,
    value_estimate: str = "child_mean",
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Node values and step-group advantages of one tree (docs/algorithm.md s.3, the public contract, s.6).

    Args:
      parent: (n,) int, ``parent[i] < i``, ``parent[0] == -1``.
      leaf_reward: (n,) float, read only at leaves (nodes with no children).
      advantage_std: ``group`` divides by each group's std, ``tree`` by the std of all centred values of
        the kept groups of the tree, ``none`` does not divide.
      tau: a group whose value std (ddof=1) is below tau is dropped; single-node groups always are.
    Returns:
      values (n,) float64 for every node; advantages (n,) float64, NaN at the root and in dropped groups.
    """
    if advantage_std not in ADVANTAGE_STD:
        raise ValueError(f"advantage_std={advantage_std!r}; expected one of {ADVANTAGE_STD}")
    if not tau >= 0:
        raise ValueError(f"tau={tau}: must be >= 0")
    values = node_values(parent, leaf_reward, value_estimate=value_estimate)
    parent = np.asarray(parent, dtype=np.int64)
    n = len(parent)
    advantages = np.full(n, np.nan)
    centred = np.full(n, np.nan)
    group_std = np.zeros(n)

    # Group = children of one parent. Group stats via bincount over the parent id (nodes 1..n-1).
    p = parent[1:]
    v = values[1:]
    count = np.bincount(p, minlength=n)
    mean = np.bincount(p, weights=v, minlength=n) / np.maximum(count, 1)
    sq = np.bincount(p, weights=(v - mean[p]) ** 2, minlength=n)
    std = np.sqrt(sq / np.maximum(count - 1, 1))
    kept_parent = (count >= 2) & (std >= tau)
    kept = np.concatenate([[False], kept_parent[p]])
    if not kept.any():
        return values, advantages
    centred[kept] = values[kept] - mean[parent[kept]]
    if advantage_std == "group":
        group_std[kept] = std[parent[kept]]
        advantages[kept] = centred[kept] / (group_std[kept] + eps)
    elif advantage_std == "tree":
        # ddof=1 over every centred value of the tree's kept groups ("re-normalisation" reading).
        c = centred[kept]
        scale = np.sqrt(np.sum(c**2) / max(len(c) - 1, 1))
        advantages[kept] = c / (scale + eps)
    else:
        advantages[kept] = centred[kept]
    return values, advantages


def group_counts(parent, advantages) -> dict[str, float]:
    """Step groups of one tree: groups (parents with >= 1 child), groups kept (with advantages) and the
    fraction filtered out."""
    parent = np.asarray(parent, dtype=np.int64)
    advantages = np.asarray(advantages, dtype=np.float64)
    parents_with_children = np.unique(parent[1:])
    kept = {int(parent[i]) for i in range(1, len(parent)) if np.isfinite(advantages[i])}
    groups = len(parents_with_children)
    return {
        "groups": float(groups),
        "groups_kept": float(len(kept)),
        "frac_groups_filtered": 1.0 - len(kept) / groups if groups else 0.0,
    }
