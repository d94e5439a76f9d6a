"""Hand-made trees and their collated packs for learner tests (no sampling, no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from rllib_treerpo.core.advantages import tree_advantages
from rllib_treerpo.core.tree import Tree
from rllib_treerpo.learner.batches import collate_minibatch
from rllib_treerpo.learner.forward import token_logprobs
from rllib_treerpo.learner.packing import pack_trees


def hand_tree(seed: int = 0, branching=(2, 2), vocab: int = 90) -> Tree:
    """A full tree with random token ids (3..vocab), 1-4 tokens per node, sampling log-probs near -4.5 and
    alternating leaf rewards (so every sibling group has an advantage at tau 0)."""
    rng = np.random.default_rng(seed)
    tree = Tree(prompt_ids=rng.integers(3, vocab, size=4), prompt_text="p", answer="1")
    frontier = [0]
    for depth, n in enumerate(branching):
        nxt = []
        for parent in frontier:
            for _ in range(n):
                k = int(rng.integers(1, 5))
                last = depth == len(branching) - 1
                node = tree.add_node(
                    parent,
                    rng.integers(3, vocab, size=k),
                    rng.normal(-4.5, 0.1, size=k),
                    "length",
                    terminal=last,
                )
                nxt.append(node)
        frontier = nxt
    for i, leaf in enumerate(tree.leaves()):
        tree.nodes[leaf].reward = float((i + seed) % 2)
    return tree


def hand_packs(seed: int = 0, layout: str = "packed", trees: int = 2):
    forest = [hand_tree(seed + t) for t in range(trees)]
    advantages = [tree_advantages(t.parent_array(), t.leaf_rewards(), tau=0.0)[1] for t in forest]
    return forest, advantages, pack_trees(forest, advantages, layout=layout)


def hand_batch(seed: int = 0, layout: str = "packed", loss_agg: str = "token_mean") -> dict[str, np.ndarray]:
    _, _, packs = hand_packs(seed, layout)
    return collate_minibatch(packs, loss_agg, pad_id=0)


def per_node_logprobs(model, tree: Tree, node: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of a node's tokens from a plain forward of its whole path (the per-row reference)."""
    ids = torch.as_tensor(tree.path_ids(node))[None]
    logits = model(input_ids=ids).logits
    return token_logprobs(logits, ids, temperature)[0, -len(tree.nodes[node].token_ids) :]
