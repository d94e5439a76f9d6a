"""Trees -> training packs: one forward row per subtree, each shared prefix computed once.

A pack holds a subtree of one tree after the tokens of its ancestors: the prompt, then every included node's
own tokens in depth-first order. Each token may attend to exactly the tokens of its node's ancestors and the
earlier tokens of its own node (forward.tree_attention_mask), and its position id continues its parent's path,
so every token sees what it would see in its own per-node row (context = path to the parent,
docs/algorithm.md s.4) and the log-probs and gradients are the same; only a shared prefix is computed once,
not once per descendant. A node's first token is predicted from the last token on its parent's path;
later tokens from the previous one.

``layout="rows"`` makes one pack per trained node (its path): the per-row layout, through the same forward.
``layout="packed"`` makes a pack of a whole tree if it holds at most ``pack_tokens`` tokens; else a node's
children's subtrees are binned after the node's path (and split further where one alone does not fit), so a
pack holds at most ``pack_tokens`` tokens unless a single root-to-node path is longer. Nodes without an
advantage (the root, filtered groups) carry no loss; they are included only as context of trained descendants.

Pure numpy: the layout only. The forward over packs (tree attention, the LM head at the loss tokens) is
forward.py; each loss token's weight (the loss aggregation) is losses.loss_weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rllib_treerpo.core.tree import Tree

LAYOUTS = ("packed", "rows")


@dataclass
class Pack:
    """One forward row. L tokens, N local nodes (0 = the prompt), M loss tokens."""

    tree: int
    input_ids: np.ndarray  # (L,) int64
    position_ids: np.ndarray  # (L,) int64: position of each token on its own root-to-node path
    token_node: np.ndarray  # (L,) int64: local node of each token
    node_parent: np.ndarray  # (N,) int64: local parent, -1 for the prompt
    node_ids: np.ndarray  # (N,) int64: the tree's index of each local node
    target_pos: np.ndarray  # (M,) int64: index of the token whose logits predict each loss token
    target_ids: np.ndarray  # (M,) int64
    advantages: np.ndarray  # (M,) float32
    old_logprobs: np.ndarray  # (M,) float32
    target_node: np.ndarray  # (M,) int64: the loss token's node index in its tree

    @property
    def loss_tokens(self) -> int:
        return len(self.target_ids)


def pack_trees(
    trees: list[Tree], advantages: list[np.ndarray], *, layout: str = "packed", pack_tokens: int = 8192
) -> list[Pack]:
    """The packs of a batch of trees; every node with a finite advantage is trained in exactly one pack."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    if len(trees) != len(advantages):
        raise ValueError(f"{len(trees)} trees but {len(advantages)} advantage arrays")
    packs = []
    for t, (tree, adv) in enumerate(zip(trees, advantages, strict=True)):
        adv = np.asarray(adv, dtype=np.float64)
        if adv.shape != (len(tree.nodes),):
            raise ValueError(f"tree {t}: advantages shape {adv.shape}, expected ({len(tree.nodes)},)")
        trained = np.isfinite(adv) & (np.array([len(n.token_ids) for n in tree.nodes]) > 0)
        trained[0] = False
        if not trained.any():
            continue
        needed = _needed(tree, trained)
        if layout == "rows":
            units = [(i, [i], {i}) for i in np.flatnonzero(trained)]
        else:
            units = _split(tree, needed, trained, 0, pack_tokens)
        packs += [_build(t, tree, adv, *unit) for unit in units if unit[2]]
    return packs


def _needed(tree: Tree, trained: np.ndarray) -> np.ndarray:
    """Nodes that are trained or are an ancestor of a trained node (the context a pack may need)."""
    needed = trained.copy()
    needed[0] = True
    for i in range(len(tree.nodes) - 1, 0, -1):  # children have larger indices: reverse order is bottom-up
        if needed[i]:
            needed[tree.nodes[i].parent] = True
    return needed


def _subtree(tree: Tree, needed: np.ndarray, top: int) -> list[int]:
    """Needed nodes of ``top``'s subtree in depth-first order (``top`` first)."""
    out = []
    stack = [top]
    while stack:
        i = stack.pop()
        out.append(i)
        stack += [c for c in reversed(tree.nodes[i].children) if needed[c]]
    return out


def _tokens(tree: Tree, nodes: list[int]) -> int:
    return sum(len(tree.nodes[i].token_ids) for i in nodes)


def _split(
    tree: Tree, needed: np.ndarray, trained: np.ndarray, top: int, budget: int
) -> list[tuple[int, list, set]]:
    """(top node, members, loss nodes) units that each fit ``budget`` tokens with ``top``'s path in front.

    ``top``'s whole subtree if it fits; else its children's subtrees binned after ``top``'s path and tokens
    (top is trained in the first unit), and a child whose subtree alone does not fit there is split the same
    way.
    """
    path = len(tree.prompt_ids) + _tokens(tree, tree.path(top)[:-1])
    members = _subtree(tree, needed, top)
    children = [c for c in tree.nodes[top].children if needed[c]]
    if path + _tokens(tree, members) <= budget or not children:
        return [(top, members, {i for i in members if trained[i]})]
    own = path + _tokens(tree, [top])
    units = []
    bins = [[]]
    for c in children:
        sub = _subtree(tree, needed, c)
        if own + _tokens(tree, sub) > budget:  # too big even alone after top: split it further
            units += _split(tree, needed, trained, c, budget)
        elif own + _tokens(tree, bins[-1] + sub) <= budget:
            bins[-1] += sub
        else:
            bins.append(sub)
    bins = [b for b in bins if b]
    if trained[top] and not bins:
        bins = [[]]
    for k, b in enumerate(bins):  # top's own loss in the first unit only
        loss = {i for i in b if trained[i]} | ({top} if k == 0 and trained[top] and top else set())
        units.append((top, [top] + b, loss))
    return units


def _build(t: int, tree: Tree, adv: np.ndarray, top: int, members: list[int], loss_nodes: set) -> Pack:
    """One pack: ``top``'s ancestors (context), then ``members`` in DFS order; ``loss_nodes`` carry loss."""
    order = [0] + tree.path(top)[:-1] + [i for i in members if i != 0]
    local = {node: k for k, node in enumerate(order)}
    ids = [np.asarray(tree.prompt_ids)]
    pos = [np.arange(len(tree.prompt_ids))]
    token_node = [np.zeros(len(tree.prompt_ids), np.int64)]
    start = {0: 0}  # index of each node's first token in the pack
    end_pos = {0: len(tree.prompt_ids)}  # position after each node's path
    last = {0: len(tree.prompt_ids) - 1}  # index of the last token on each node's path
    cursor = len(tree.prompt_ids)
    targets = []
    for node in order[1:]:
        n = tree.nodes[node]
        p = n.parent
        k = len(n.token_ids)
        start[node] = cursor
        end_pos[node] = end_pos[p] + k
        last[node] = cursor + k - 1 if k else last[p]
        ids.append(n.token_ids)
        pos.append(np.arange(end_pos[p], end_pos[p] + k))
        token_node.append(np.full(k, local[node], np.int64))
        if node in loss_nodes:
            predict = np.concatenate([[last[p]], cursor + np.arange(k - 1)])
            targets.append((predict, n.token_ids, np.full(k, adv[node]), n.logprobs, np.full(k, node)))
        cursor += k
    parent = np.array([-1] + [local[tree.nodes[node].parent] for node in order[1:]], np.int64)
    predict, target_ids, advantages, old_logprobs, nodes = (
        np.concatenate(x) for x in zip(*targets, strict=True)
    )
    return Pack(
        t,
        np.concatenate(ids).astype(np.int64),
        np.concatenate(pos).astype(np.int64),
        np.concatenate(token_node),
        parent,
        np.asarray(order, np.int64),
        predict.astype(np.int64),
        target_ids.astype(np.int64),
        advantages.astype(np.float32),
        old_logprobs.astype(np.float32),
        nodes.astype(np.int64),
    )


def collate(
    packs: list[Pack], weights: list[np.ndarray], pad_id: int, pad_to: int = 0
) -> dict[str, np.ndarray]:
    """Right-padded arrays of a list of packs (B = max(len(packs), pad_to) rows; extra rows are empty).

    input_ids/position_ids/token_node (B, L) (token_node -1 at padding), node_parent (B, N), target_pos/
    target_ids/advantages/old_logprobs/loss_weight (B, M) (weight 0 at padding).
    """
    b = max(len(packs), pad_to, 1)
    width = max([len(p.input_ids) for p in packs] + [1])
    nodes = max([len(p.node_parent) for p in packs] + [1])
    m = max([p.loss_tokens for p in packs] + [1])
    out = {
        "input_ids": np.full((b, width), pad_id, np.int64),
        "position_ids": np.zeros((b, width), np.int64),
        "token_node": np.full((b, width), -1, np.int64),
        "node_parent": np.full((b, nodes), -1, np.int64),
        "target_pos": np.zeros((b, m), np.int64),
        "target_ids": np.full((b, m), pad_id, np.int64),
        "advantages": np.zeros((b, m), np.float32),
        "old_logprobs": np.zeros((b, m), np.float32),
        "loss_weight": np.zeros((b, m), np.float32),
    }
    for r, (p, w) in enumerate(zip(packs, weights, strict=True)):
        n = len(p.input_ids)
        out["input_ids"][r, :n] = p.input_ids
        out["position_ids"][r, :n] = p.position_ids
        out["token_node"][r, :n] = p.token_node
        out["node_parent"][r, : len(p.node_parent)] = p.node_parent
        k = p.loss_tokens
        for key, value in (
            ("target_pos", p.target_pos),
            ("target_ids", p.target_ids),
            ("advantages", p.advantages),
            ("old_logprobs", p.old_logprobs),
            ("loss_weight", w),
        ):
            out[key][r, :k] = value
    return out
