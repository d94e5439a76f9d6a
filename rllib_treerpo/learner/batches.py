"""An iteration's training packs -> minibatches (optimizer steps) -> micro-batches (forwards).

:func:`minibatches` splits the packs into ``num_minibatches`` optimizer steps per epoch of about equal loss
tokens (every loss token exactly once per epoch, docs/algorithm.md s.4), whatever the tree shape, each
collated with loss weights that hold the whole minibatch's normalisation (losses.loss_weights), so
micro-batches and learners just add their parts; :func:`micro_batches` splits a minibatch into forwards of at
most ``forward_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rllib_treerpo.core.losses import loss_weights
from rllib_treerpo.learner.packing import Pack, collate


@dataclass(frozen=True)
class BatchSettings:
    """How an update splits its packs, read from a config once (:meth:`from_config`)."""

    num_minibatches: int  # optimizer steps per epoch
    num_epochs: int
    loss_agg: str  # the loss aggregation, carried by each minibatch's loss weights
    forward_tokens: int | None  # padded tokens per forward (None: the whole minibatch at once)

    @classmethod
    def from_config(cls, config: Any) -> BatchSettings:
        return cls(
            num_minibatches=config.num_minibatches,
            num_epochs=config.num_epochs,
            loss_agg=config.loss_agg,
            forward_tokens=config.forward_tokens,
        )


def minibatch_seed(seed: int | None, iteration: int) -> int:
    """The seed that shuffles iteration ``iteration``'s packs into minibatches (a resumed run replays it)."""
    return int(np.random.SeedSequence([seed or 0, iteration, 17]).generate_state(1)[0])


def minibatch_plan(
    packs: list[Pack], num_minibatches: int, *, num_epochs: int = 1, shuffle: bool = True, seed: int = 0
) -> list[list[int]]:
    """Pack indices of each minibatch: every pack once per epoch, in ``num_minibatches`` parts of about equal
    loss tokens (fewer when there are fewer packs). Shuffled per epoch with a generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    parts = max(1, min(num_minibatches, len(packs)))
    plan = []
    for _ in range(num_epochs):
        order = rng.permutation(len(packs)) if shuffle else np.arange(len(packs))
        tokens = np.array([packs[i].loss_tokens for i in order], dtype=np.float64)
        # A pack goes to the part its middle token falls in: contiguous parts of about equal loss tokens.
        middle = np.cumsum(tokens) - tokens / 2
        part = np.minimum((middle / max(tokens.sum(), 1.0) * parts).astype(int), parts - 1)
        plan += [order[part == k].tolist() for k in range(parts) if (part == k).any()]
    return plan


def collate_minibatch(
    packs: list[Pack], loss_agg: str, pad_id: int, pad_to: int = 0
) -> dict[str, np.ndarray]:
    """The packs of one minibatch collated (packing.collate) with their loss weights (losses.loss_weights)."""
    return collate(packs, loss_weights([p.target_node for p in packs], loss_agg), pad_id, pad_to=pad_to)


def minibatches(
    packs: list[Pack], settings: BatchSettings, pad_id: int, *, seed: int, num_learners: int = 1
) -> list[dict[str, np.ndarray]]:
    """The collated minibatches of one update: ``num_minibatches`` per ``num_epochs``, each padded to a
    multiple of ``num_learners`` rows (empty rows weigh 0), so every learner gets a shard of every minibatch
    and takes the same number of optimizer steps (uneven shards hang DDP)."""
    out = []
    plan = minibatch_plan(packs, settings.num_minibatches, num_epochs=settings.num_epochs, seed=seed)
    for index in plan:
        chosen = [packs[i] for i in index]
        rows = -(-len(chosen) // num_learners) * num_learners
        out.append(collate_minibatch(chosen, settings.loss_agg, pad_id, pad_to=rows))
    return out


def micro_batches(batch: dict[str, Any], forward_tokens: int | None) -> list[dict[str, Any]]:
    """Split a collated minibatch (arrays or tensors) into forwards of at most ``forward_tokens`` padded
    tokens (rows x longest row; one row can exceed it), each trimmed to its own longest row, node count
    and loss-token count."""
    length = (batch["token_node"] >= 0).sum(1).tolist()
    order = sorted(range(len(length)), key=lambda r: length[r])
    groups = []
    current = []
    for r in order:
        if current and forward_tokens and (len(current) + 1) * length[r] > forward_tokens:
            groups.append(current)
            current = []
        current.append(r)
    groups.append(current)
    out = []
    for rows in groups:
        index = torch.as_tensor(rows) if isinstance(batch["token_node"], torch.Tensor) else np.asarray(rows)
        part = {k: v[index] for k, v in batch.items()}
        width = max(int((part["token_node"] >= 0).sum(1).max()), 1)
        nodes = int(part["token_node"].max()) + 1 if width else 1
        targets = max(int((part["loss_weight"] > 0).sum(1).max()), 1)
        for key, size in (
            ("input_ids", width),
            ("position_ids", width),
            ("token_node", width),
            ("node_parent", max(nodes, 1)),
            ("target_pos", targets),
            ("target_ids", targets),
            ("advantages", targets),
            ("old_logprobs", targets),
            ("loss_weight", targets),
        ):
            part[key] = part[key][:, :size]
        out.append(part)
    return out


def as_tensors(batch: dict[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
