"""The TreeRPO objective (docs/algorithm.md s.4), all of it: pure functions, tensors in, loss and stats out.

Shapes: B rows (collated training packs), M loss-token slots per row. Every per-token tensor is (B, M)
and aligned with the batch's ``target_ids``; a slot carries loss exactly where its weight is > 0 (padding
weighs 0).

- the aggregation: :func:`loss_weights` gives each loss token the weight whose weighted sum over a minibatch
  is the minibatch's ``token_mean`` or ``seq_mean_token_mean``; the weights travel with the collated packs, so
  micro-batches and learners just add their parts (the only aggregation there is: training and tests use it);
- per token: :func:`clipped_surrogate`, :func:`kl_penalty`, :func:`truncated_is_weights`;
- :func:`policy_loss`: the weighted surrogate plus KL and its statistics;
- :func:`compute_loss`: one (micro-)batch's loss as the learner runs it (truncated IS, the learner scaling,
  the sampler/learner mismatch statistic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")


@dataclass(frozen=True)
class LossSettings:
    """The objective's knobs, read from a config once (:meth:`from_config`); the defaults are the config's."""

    clip_eps_low: float
    clip_eps_high: float
    kl_coef: float
    kl_estimator: str
    tis_cap: float | None

    @classmethod
    def from_config(cls, config: Any) -> LossSettings:
        return cls(
            clip_eps_low=config.clip_eps_low,
            clip_eps_high=config.clip_eps_high,
            kl_coef=config.kl_coef,
            kl_estimator=config.kl_estimator,
            tis_cap=config.tis_cap,
        )


def loss_weights(token_groups: Sequence[np.ndarray], loss_agg: str) -> list[np.ndarray]:
    """Per loss token, the weight whose weighted sum over all parts is the loss aggregation.

    ``token_groups[p]`` (M_p,) int: the group (tree node, i.e. sequence) of each loss token of part p; a group
    lies in one part only. ``token_mean``: 1 / (loss tokens of all parts); ``seq_mean_token_mean``: 1 /
    (groups x the group's tokens), the mean over groups of each group's token mean (original GRPO). Returns
    (M_p,) float32 per part; no loss token at all gives no weight (a loss of 0).
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r}; expected one of {LOSS_AGGS}")
    if loss_agg == "token_mean":
        total = sum(len(g) for g in token_groups)
        return [np.full(len(g), 1.0 / max(total, 1), np.float32) for g in token_groups]
    groups = sum(len(np.unique(g)) for g in token_groups)
    out = []
    for g in token_groups:
        _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
        out.append((1.0 / (max(groups, 1) * counts[inverse])).astype(np.float32))
    return out


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: (B, M) each -> (loss, ratio, clipped), all (B, M).

    ``loss = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with
    ``rho = exp(logprobs - old_logprobs)``; ``clipped`` is True where the clipped term was the smaller one.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1/k2/k3): (B, M)."""
    log_ratio = ref_logprobs - logprobs  # log(pi_ref / pi_theta)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl_estimator={estimator!r}; expected one of {KL_ESTIMATORS}")


def truncated_is_weights(
    learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights for a sampler that is not the learner (e.g. vLLM), per token:
    ``min(pi_learner / pi_sampler, cap) = min(exp(learner - sampler), cap)``, detached. (B, M) -> (B, M).

    TRL's ``vllm_importance_sampling_correction`` and verl's token-level TIS: the policy-gradient loss of each
    token is multiplied by this weight, ``learner_logprobs`` being the learner's log-probs under the weights
    the sampler sampled with (pi_old). Truncation bounds the variance where the sampler under-rates a token.
    """
    return torch.exp(learner_logprobs.detach() - sampler_logprobs).clamp(max=cap)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate plus KL to a reference policy, summed with the tokens' aggregation weights.

    Per token: ``-w min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + kl_coef * KL``, w = ``is_weights``
    (detached, e.g. :func:`truncated_is_weights`; 1 when None). All inputs (B, M); ``weights`` from
    :func:`loss_weights` (0: no loss); ``ref_logprobs`` is required when ``kl_coef > 0``.
    Returns the scalar loss and detached stats: policy_loss, kl, clip_frac (share of loss tokens where the
    clipped term was the smaller one), approx_kl (k3 of pi_old vs pi_theta), ratio_mean.
    """
    mask = (weights > 0).to(logprobs.dtype)
    pg, ratio, took_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    pg_loss = (pg * weights).sum()
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs (log-probs of the reference model)")
        kl = (kl_penalty(logprobs, ref_logprobs, kl_estimator) * weights).sum()
    else:
        kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    loss = pg_loss + kl_coef * kl

    with torch.no_grad():
        count = mask.sum().clamp(min=1.0)
        log_ratio = logprobs - old_logprobs
        stats = {
            "policy_loss": pg_loss.detach(),
            "kl": kl.detach(),
            "clip_frac": (took_clipped.to(mask.dtype) * mask).sum() / count,
            "approx_kl": ((torch.exp(-log_ratio) + log_ratio - 1.0) * mask).sum() / count,
            "ratio_mean": (ratio * mask).sum() / count,
        }
    return loss, stats


def compute_loss(
    logprobs: torch.Tensor,
    batch: dict[str, torch.Tensor],
    settings: LossSettings,
    ref_logprobs: torch.Tensor | None = None,
    scale: float = 1.0,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The TreeRPO loss of one (micro-)batch of packs from the policy's log-probs of its loss tokens.

    ``logprobs`` (B, M) and ``entropy`` (B, M, for the stats) as forward.target_stats returns them;
    ``batch`` holds the collated packs (advantages, old_logprobs, loss_weight: (B, M)); ``ref_logprobs`` (B,
    M) are the frozen reference model's, needed when ``settings.kl_coef > 0``. The loss is :func:`policy_loss`
    times ``scale`` (the number of learners: DDP averages their gradients, the weights sum them).
    Returns the loss and float stats: policy_loss, kl, clip_frac, approx_kl, ratio_mean, entropy, total,
    logprob_mismatch (mean |learner - sampler log-prob| over loss tokens: before the iteration's first
    optimizer step, the sampler/learner numerical mismatch, e.g. vLLM vs transformers), and with
    ``settings.tis_cap`` tis_weight_mean.

    With ``tis_cap`` (one optimizer step per iteration, so the current policy IS the one that sampled) the
    ratio is taken against the learner's own detached log-probs and each token is weighted by
    ``min(pi_learner / pi_sampler, tis_cap)`` (:func:`truncated_is_weights`): how TRL and verl correct
    for vLLM.
    """
    weights = batch["loss_weight"]
    mask = (weights > 0).to(torch.float32)
    old = batch["old_logprobs"]
    is_weights = None
    if settings.tis_cap is not None:
        is_weights = truncated_is_weights(logprobs, old, settings.tis_cap)
        old = logprobs.detach()
    loss, stats = policy_loss(
        logprobs,
        old,
        batch["advantages"],
        weights.to(logprobs.dtype),
        eps_low=settings.clip_eps_low,
        eps_high=settings.clip_eps_high,
        ref_logprobs=ref_logprobs,
        kl_coef=settings.kl_coef,
        kl_estimator=settings.kl_estimator,
        is_weights=is_weights,
    )
    loss = loss * scale
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        mean_entropy = float("nan") if entropy is None else float((entropy * mask).sum() / count)
        mismatch = ((logprobs - batch["old_logprobs"]).abs() * mask).sum() / count
    out = {name: float(value) for name, value in stats.items()}
    out.update(entropy=mean_entropy, total=float(loss.detach()), logprob_mismatch=float(mismatch))
    if is_weights is not None:
        out["tis_weight_mean"] = float((is_weights * mask).sum() / count)
    return loss, out
