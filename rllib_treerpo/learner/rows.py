"""Trees -> advantages -> training packs (docs/algorithm.md s.3, s.4), with the tree metrics. Pure numpy.

The one place where a batch of sampled trees becomes learner input; the algorithm and the benchmarks call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rllib_treerpo.core.advantages import group_counts, tree_advantages
from rllib_treerpo.core.tree import Tree, tree_metrics
from rllib_treerpo.learner.packing import Pack, pack_trees


@dataclass(frozen=True)
class PackSettings:
    """How trees become packs (advantages, then the layout), read from a config once (:meth:`from_config`)."""

    tau: float
    advantage_std: str
    value_estimate: str
    advantage_eps: float
    layout: str  # packing.LAYOUTS: "packed" subtrees or one row per node
    pack_tokens: int

    @classmethod
    def from_config(cls, config: Any) -> PackSettings:
        return cls(
            tau=config.tau,
            advantage_std=config.advantage_std,
            value_estimate=config.value_estimate,
            advantage_eps=config.advantage_eps,
            layout="packed" if config.packing else "rows",
            pack_tokens=config.pack_tokens,
        )


def build_training_batch(trees: list[Tree], settings: PackSettings) -> tuple[list[Pack], dict[str, float]]:
    """Advantages for every tree (docs/algorithm.md s.3) laid out as training packs (s.4, packing.py), and the
    metrics: tree.tree_metrics plus the step groups and the packs."""
    advantages = []
    groups = 0.0
    kept = 0.0
    for tree in trees:
        parent = tree.parent_array()
        _, adv = tree_advantages(
            parent,
            tree.leaf_rewards(),
            advantage_std=settings.advantage_std,
            tau=settings.tau,
            value_estimate=settings.value_estimate,
            eps=settings.advantage_eps,
        )
        advantages.append(adv)
        counts = group_counts(parent, adv)
        groups += counts["groups"]
        kept += counts["groups_kept"]
    packs = pack_trees(trees, advantages, layout=settings.layout, pack_tokens=settings.pack_tokens)
    metrics = tree_metrics(trees)
    metrics.update(
        {
            "tree/groups": groups,
            "tree/frac_groups_filtered": 1.0 - kept / groups if groups else 0.0,
            "tree/train_packs": float(len(packs)),
            "tree/train_tokens": float(sum(p.loss_tokens for p in packs)),
            "tree/packed_tokens": float(sum(len(p.input_ids) for p in packs)),
        }
    )
    return packs, metrics
