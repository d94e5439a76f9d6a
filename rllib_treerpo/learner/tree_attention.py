"""Attention over tree packs without the masked work: per node, its tokens against its path's keys only.

A pack's tree mask (forward.tree_attention_mask) is mostly False: a token sees its ancestors and its own
earlier tokens, never its siblings' subtrees. A dense L x L masked attention computes every pair anyway, which
on a CPU (no FlexAttention backward there) costs more than the per-row layout saves. Here each node's tokens
attend to the gathered keys of their own root-to-node path, nodes of equal depth batched together: the
attention work is what the per-row layout does for the trained tokens, the projections and MLPs run once per
unique token.

It plugs into transformers as an attention function (registered as ``"treerpo_segments"``): the decoder is
called with ``segment_plan=SegmentPlan`` (model kwargs reach every attention call, whereas a mask argument is
rebuilt by some models' mask preparation) while the model's attention implementation is switched to this
function; a call without a plan falls through to sdpa unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

NAME = "treerpo_segments"


@dataclass
class Bucket:
    """Nodes of one depth: G nodes, m = longest node, p = longest path (ancestors' tokens + own)."""

    batch: torch.Tensor  # (G,) pack row of each node
    q_index: torch.Tensor  # (G, m) token index of each query (padding: 0)
    q_valid: torch.Tensor  # (G, m) bool
    kv_index: torch.Tensor  # (G, p) token index of each key (padding: 0)
    mask: torch.Tensor  # (G, 1, m, p) bool, True = attend
    _additive: dict = field(default_factory=dict, repr=False)  # dtype -> (G, 1, m, p) 0 / -inf

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as sdpa's additive float mask in ``dtype``, built once per plan and shared by every layer.

        Given the bool mask, sdpa converts it to this in every layer and autograd keeps each layer's copy for
        the backward: (G, m, p) floats per layer, on a CPU (and the tiny model) the largest saved tensor of a
        pack's forward. One shared tensor is saved once; the values are sdpa's own conversion, so results are
        unchanged.
        """
        if dtype not in self._additive:
            zero = torch.zeros((), dtype=dtype, device=self.mask.device)
            self._additive[dtype] = torch.where(self.mask, zero, float("-inf"))
        return self._additive[dtype]


@dataclass
class SegmentPlan:
    buckets: list[Bucket]
    length: int  # L, the pack width
    # (B * L,) for each token, its row in the buckets' valid queries concatenated in bucket order: every token
    # is the query of exactly one bucket (padding in the last), so one gather assembles the attention output
    placement: torch.Tensor


def segment_plan(token_node: torch.Tensor, node_parent: torch.Tensor) -> SegmentPlan:
    """The buckets of a collated batch: (B, L) local node per token (-1: padding), (B, N) local parents."""
    tn = token_node.cpu().numpy()
    parents = node_parent.cpu().numpy()
    groups: dict[int, list] = {}  # depth -> [(row, own token indices, ancestor token indices)]
    for b in range(tn.shape[0]):
        valid = tn[b] >= 0
        if not valid.any():
            continue
        nodes = int(tn[b][valid].max()) + 1
        ranges = {n: np.flatnonzero(tn[b] == n) for n in range(nodes)}  # a node's tokens are contiguous
        path = {0: []}  # ancestors of each local node, root first; parents come before children (DFS order)
        for n in range(1, nodes):
            path[n] = path[parents[b, n]] + [parents[b, n]]
        for n in range(nodes):
            if len(ranges[n]):
                before = np.concatenate([ranges[a] for a in path[n]] + [np.zeros(0, np.int64)])
                groups.setdefault(len(path[n]), []).append((b, ranges[n], before))
    device = token_node.device
    buckets = [_bucket(members, device) for _, members in sorted(groups.items())]
    rows, cols = np.nonzero(tn < 0)
    # padding attends to itself: every row (an empty one too) uses the attention weights, as DDP needs
    if len(rows):
        own = torch.from_numpy(cols).to(device)[:, None]
        ones = torch.ones(len(rows), 1, 1, 1, dtype=torch.bool, device=device)
        buckets.append(Bucket(torch.from_numpy(rows).to(device), own, own >= 0, own, ones))
    return SegmentPlan(buckets, tn.shape[1], _placement(buckets, tn.shape[0], tn.shape[1]))


def _placement(buckets: list[Bucket], rows: int, length: int) -> torch.Tensor:
    """The inverse of the buckets' query order (:attr:`SegmentPlan.placement`)."""
    flat = [(b.batch[:, None] * length + b.q_index)[b.q_valid] for b in buckets]
    order = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64)
    if order.numel() != rows * length:
        raise AssertionError(f"segment plan covers {order.numel()} of {rows * length} tokens")
    placement = torch.empty_like(order)
    placement[order] = torch.arange(order.numel(), device=order.device)
    return placement


def _bucket(members: list, device: torch.device) -> Bucket:
    g = len(members)
    m = max(len(own) for _, own, _ in members)
    p = max(len(before) + len(own) for _, own, before in members)
    q_index = np.zeros((g, m), np.int64)
    q_valid = np.zeros((g, m), bool)
    kv_index = np.zeros((g, p), np.int64)
    mask = np.zeros((g, m, p), bool)
    for i, (_, own, before) in enumerate(members):
        a = len(before)
        k = len(own)
        q_index[i, :k] = own
        q_valid[i, :k] = True
        kv_index[i, : a + k] = np.concatenate([before, own])
        mask[i, :k, :a] = True  # every ancestor token
        mask[i, :k, a : a + k] = np.tril(np.ones((k, k), bool))  # own earlier tokens
        mask[i, k:, 0] = True  # padding queries attend somewhere (their output is dropped)
    as_t = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
    batch = torch.tensor([b for b, _, _ in members], device=device)
    return Bucket(batch, as_t(q_index), as_t(q_valid), as_t(kv_index), as_t(mask)[:, None])


def _gather_keys(source: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, L, Hkv, D) keys or values -> (G, H, p, D): each node's path, repeated for grouped-query heads."""
    from transformers.integrations.sdpa_attention import repeat_kv

    return repeat_kv(source[rows, index].transpose(1, 2), groups)


@contextlib.contextmanager
def _saved_as_gathers(gathers: list) -> Iterator[None]:
    """Autograd keeps each gathered key/value tensor as its recipe and gathers it again for the backward.

    A bucket's keys are its nodes' whole paths, so a packed subtree's ancestors are copied once per descendant
    (8 children of one node: 8 copies of its path); sdpa would keep those copies, per layer, until the
    backward. Kept as (source, rows, index) they cost the layer's own keys and values once; the gather is
    cheap and gives the same tensor bit for bit.
    """

    def key(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.shape, t.stride(), t.dtype

    # by address, not the tensors themselves: autograd may keep the hooks, and with them what they hold, alive
    recipes = {key(gathered): recipe for gathered, recipe in gathers}
    del gathers

    def pack(t: torch.Tensor):
        return recipes.get(key(t), t)

    def unpack(saved):
        return _gather_keys(*saved) if isinstance(saved, tuple) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def segment_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs
):
    """transformers attention function: (B, H, L, D) query, (B, Hkv, L, D) key/value -> (B, L, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = kwargs.pop("segment_plan", None)
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, L, heads, D)
    outputs = []  # each bucket's valid queries' (n, H, D), in the dtype attention computes in
    for bucket in plan.buckets:
        rows = bucket.batch[:, None]
        qg = q[rows, bucket.q_index].transpose(1, 2)  # (G, H, m, D)
        recipes = [(x, rows, bucket.kv_index, groups) for x in (k, v)]
        kg, vg = (_gather_keys(*r) for r in recipes)  # (G, H, p, D)
        with _saved_as_gathers(list(zip((kg, vg), recipes, strict=True))):
            og = torch.nn.functional.scaled_dot_product_attention(
                qg,
                kg,
                vg,
                attn_mask=bucket.additive(qg.dtype),
                scale=scaling,
                dropout_p=dropout if module.training else 0.0,
            )
        outputs.append(og.transpose(1, 2)[bucket.q_valid])
    b, heads, length, dim = query.shape
    if not outputs:
        return query.new_zeros(b, length, heads, dim), None
    return torch.cat(outputs)[plan.placement].view(b, length, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, segment_attention)


@contextlib.contextmanager
def using_segments(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with segment attention for the duration (other masks still go to sdpa)."""
    register()
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = old
