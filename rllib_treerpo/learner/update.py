"""The learner update without Ray, step for step what the RLlib learner does (benchmarks and replicas).

Per minibatch (batches.minibatches): per micro-batch the packed forward under the config's precision
(forward.target_stats), the loss (losses.compute_loss) and its backward; then global-norm clipping, the AdamW
step, and the gradients freed. rllib/learner.py runs the same steps through RLlib's Learner; the tests check
that both give the same parameters from the same packs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rllib_treerpo.core.losses import LossSettings, compute_loss
from rllib_treerpo.learner.batches import BatchSettings, as_tensors, micro_batches, minibatches
from rllib_treerpo.learner.forward import ForwardSettings, target_stats
from rllib_treerpo.learner.packing import Pack


@dataclass(frozen=True)
class UpdateSettings:
    """Everything one learner update reads from a config, read once (:meth:`from_config`)."""

    loss: LossSettings
    forward: ForwardSettings
    batches: BatchSettings
    grad_clip: float | None

    @classmethod
    def from_config(cls, config: Any) -> UpdateSettings:
        return cls(
            loss=LossSettings.from_config(config),
            forward=ForwardSettings.from_config(config),
            batches=BatchSettings.from_config(config),
            grad_clip=config.grad_clip,
        )


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The learners' optimizer (RLlib's learner, the Ray-free update): AdamW, fused where torch has the kernel
    (CPU and CUDA): one pass per parameter with no temporaries, where the default per-tensor loop allocates
    parameter-sized intermediates at the step that is the update's peak."""
    params = list(params)
    devices = {p.device.type for p in params if isinstance(p, torch.Tensor)}
    return torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, fused=bool(devices) and devices <= {"cpu", "cuda"}
    )


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    packs: list[Pack],
    settings: UpdateSettings,
    *,
    pad_id: int = 0,
    seed: int = 0,
    ref_model: torch.nn.Module | None = None,
) -> list[dict[str, float]]:
    """One learner update of ``model`` on an iteration's ``packs``, its minibatches shuffled with ``seed``.
    Returns per-minibatch stats (the last micro-batch's, plus grad_norm when clipping)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    model.train()
    for batch in minibatches(packs, settings.batches, pad_id, seed=seed):
        optimizer.zero_grad(set_to_none=True)
        for part in micro_batches(as_tensors(batch, device), settings.batches.forward_tokens):
            ref_logprobs = None
            if ref_model is not None and settings.loss.kl_coef > 0:
                with torch.no_grad():
                    ref_logprobs, _ = target_stats(ref_model, part, settings.forward)
            logprobs, entropy = target_stats(model, part, settings.forward)
            loss, stats = compute_loss(logprobs, part, settings.loss, ref_logprobs, entropy=entropy)
            loss.backward()
        if settings.grad_clip:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(stats)
    model.eval()
    return out
