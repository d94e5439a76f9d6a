"""Trees -> training packs: one forward row per subtree, each shared prefix computed once (SPEC.md s.4).

A pack holds a subtree of one tree after the tokens of its ancestors: the prompt, then every included node's own
tokens in depth-first order. Each token may attend to exactly the tokens of its node's ancestors and the earlier
tokens of its own node (:func:`tree_attention_mask`), and its position id continues its parent's path, so every
token sees what it would see in its own per-node row (context = path to the parent, SPEC.md s.4) and the
log-probs and gradients are the same; only the shared prefixes are no longer recomputed once per descendant.
A node's first token is predicted from the last token on its parent's path; later tokens from the previous one.

``layout="rows"`` makes one pack per trained node (its path): the per-row layout, through the same forward.
``layout="packed"`` makes a pack of a whole tree if it holds at most ``pack_tokens`` tokens; else a node's
children's subtrees are binned after the node's path (and split further where one alone does not fit), so a pack
holds at most ``pack_tokens`` tokens unless a single root-to-node path is longer. Nodes without an advantage (the root, filtered
groups) carry no loss; they are included only as context of trained descendants.

Pure numpy (and torch for the mask and the forward at the bottom).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rllib_treerpo.losses import head_target_stats
from rllib_treerpo.tree import Tree

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
    out, stack = [], [top]
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

    ``top``'s whole subtree if it fits; else its children's subtrees binned after ``top``'s path and tokens (top
    is trained in the first unit), and a child whose subtree alone does not fit there is split the same way.
    """
    path = len(tree.prompt_ids) + _tokens(tree, tree.path(top)[:-1])
    members = _subtree(tree, needed, top)
    children = [c for c in tree.nodes[top].children if needed[c]]
    if path + _tokens(tree, members) <= budget or not children:
        return [(top, members, {i for i in members if trained[i]})]
    own = path + _tokens(tree, [top])
    units, bins = [], [[]]
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
    """Lay out ``top``'s ancestors (context) then ``members`` (DFS order) as one pack; ``loss_nodes`` carry loss."""
    order = [0] + tree.path(top)[:-1] + [i for i in members if i != 0]
    local = {node: k for k, node in enumerate(order)}
    ids, pos, token_node = [np.asarray(tree.prompt_ids)], [np.arange(len(tree.prompt_ids))], []
    token_node.append(np.zeros(len(tree.prompt_ids), np.int64))
    start = {0: 0}  # index of each node's first token in the pack
    end_pos = {0: len(tree.prompt_ids)}  # position after each node's path
    last = {0: len(tree.prompt_ids) - 1}  # index of the last token on each node's path
    cursor = len(tree.prompt_ids)
    targets = []
    for node in order[1:]:
        n, p = tree.nodes[node], tree.nodes[node].parent
        k = len(n.token_ids)
        start[node], end_pos[node] = cursor, end_pos[p] + k
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


def loss_weights(packs: list[Pack], loss_agg: str) -> list[np.ndarray]:
    """Per loss token, the weight whose weighted sum over ``packs`` is the loss aggregation of SPEC.md s.4.

    ``token_mean``: 1 / (loss tokens of all packs); ``seq_mean_token_mean``: 1 / (nodes x the node's tokens),
    i.e. the mean over nodes (rows) of each node's token mean.
    """
    total = sum(p.loss_tokens for p in packs)
    if loss_agg == "token_mean":
        return [np.full(p.loss_tokens, 1.0 / max(total, 1), np.float32) for p in packs]
    if loss_agg != "seq_mean_token_mean":
        raise ValueError(f"loss_agg={loss_agg!r}; expected token_mean or seq_mean_token_mean")
    nodes = sum(len(np.unique(p.target_node)) for p in packs)
    out = []
    for p in packs:
        _, inverse, counts = np.unique(p.target_node, return_inverse=True, return_counts=True)
        out.append((1.0 / (max(nodes, 1) * counts[inverse])).astype(np.float32))
    return out


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
        n, k = len(p.input_ids), p.loss_tokens
        out["input_ids"][r, :n], out["position_ids"][r, :n], out["token_node"][r, :n] = (
            p.input_ids,
            p.position_ids,
            p.token_node,
        )
        out["node_parent"][r, : len(p.node_parent)] = p.node_parent
        for key, value in (
            ("target_pos", p.target_pos),
            ("target_ids", p.target_ids),
            ("advantages", p.advantages),
            ("old_logprobs", p.old_logprobs),
            ("loss_weight", w),
        ):
            out[key][r, :k] = value
    return out


# --- torch: the mask and the forward -------------------------------------------------------------------------
def tree_attention_mask(token_node: torch.Tensor, node_parent: torch.Tensor) -> torch.Tensor:
    """(B, L) local node per token (-1: padding), (B, N) local parents -> (B, 1, L, L) bool, True = attend.

    Token i attends to token j iff j <= i and j's node is i's node or one of its ancestors. A padding token
    attends to itself only (a row with nothing to attend to would give NaN in attention).
    """
    b, n = node_parent.shape
    device = node_parent.device
    ancestor = (
        torch.eye(n, dtype=torch.bool, device=device).expand(b, n, n).clone()
    )  # [b, node, its ancestor]
    current = torch.arange(n, device=device).expand(b, n)
    for _ in range(n):  # walk every node up to the prompt, one level per step
        current = torch.where(current >= 0, node_parent.gather(1, current.clamp(min=0)), current)
        if (current < 0).all():
            break
        ancestor |= torch.nn.functional.one_hot(current.clamp(min=0), n).bool() & (current >= 0)[..., None]
    rows = torch.arange(b, device=device)[:, None, None]
    node = token_node.clamp(min=0)
    mask = ancestor[rows, node[:, :, None], node[:, None, :]]  # (B, L, L)
    length = token_node.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=token_node.device).tril()
    valid = token_node >= 0
    mask = mask & causal & valid[:, None, :] & valid[:, :, None]
    mask |= torch.eye(length, dtype=torch.bool, device=token_node.device) & ~valid[:, :, None]
    return mask[:, None]


ATTENTIONS = ("segments", "dense")


def packed_hidden(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], attention: str = "segments"
) -> torch.Tensor:
    """(B, M, H) final hidden states at the positions that predict each loss token (the LM head's inputs).

    ``attention="segments"`` (tree_attention.py): each node's tokens against their own path's keys, no masked work;
    ``"dense"``: one 4D tree mask for the model's attention (sdpa takes it as is; eager/flex get it additive).
    Either way the tree structure is always passed: given no mask and position ids that do not increase by one,
    transformers infers "packed documents" and builds a wrong mask silently (tests/test_packing.py shows it).
    """
    from rllib_treerpo.tree_attention import segment_plan, using_segments

    decoder = model.get_decoder()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if attention == "segments":
        with using_segments(model):
            plan = segment_plan(batch["token_node"], batch["node_parent"])
            hidden = decoder(**inputs, attention_mask={"full_attention": plan}).last_hidden_state
    elif attention == "dense":
        mask = tree_attention_mask(batch["token_node"], batch["node_parent"])
        if (
            getattr(model.config, "_attn_implementation", "sdpa") != "sdpa"
        ):  # eager/flex: the mask is additive
            mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(model.dtype).min
            )
        hidden = decoder(**inputs, attention_mask=mask).last_hidden_state
    else:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTIONS}")
    index = batch["target_pos"][..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def packed_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], attention: str = "segments"
) -> torch.Tensor:
    """(B, M, V) logits at the positions that predict each loss token (the LM head runs there only)."""
    return model.get_output_embeddings()(packed_hidden(model, batch, attention))


def packed_target_stats(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    attention: str = "segments",
    temperature: float = 1.0,
    logits_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) tempered log-prob of each loss token and (B, M) entropy (detached) of its next-token distribution,
    the LM head run at the predicting positions only, ``logits_chunk`` positions at a time
    (losses.head_target_stats: what the learner's loss needs, without a (B, M, V) logits block)."""
    hidden = packed_hidden(model, batch, attention)
    return head_target_stats(
        model.get_output_embeddings(), hidden, batch["target_ids"], temperature, logits_chunk
    )
