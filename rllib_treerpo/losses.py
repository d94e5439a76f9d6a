"""The TreeRPO objective (SPEC.md s.4). Pure torch: tensors in, loss and stats out.

Shapes: B rows (one per trained tree node), T token positions. Every per-token tensor is (B, T) and aligned to
``input_ids``: position t holds the value for token t (predicted from logits at t - 1), and ``mask`` is 1 exactly
at the tokens that carry loss.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for softmax arithmetic; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each token under the model: (B, T, V) logits, (B, T) ids -> (B, T), position 0 gets 0.

    Logits are divided by ``temperature`` so that rho = pi_theta / pi_old compares the same distribution the
    sampler drew from. Computed as gathered logit minus logsumexp, without materialising a (B, T, V) log-softmax.
    """
    logits = _upcast(logits[:, :-1]) / temperature
    picked = torch.gather(logits, -1, input_ids[:, 1:, None]).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(out, (1, 0), value=0.0)


def target_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each target under logits already taken at its predicting position: (B, M, V), (B, M) -> (B, M).

    The same tempered quantity as :func:`token_logprobs` (and the sampler), for the packed forward's logits.
    """
    logits = _upcast(logits) / temperature
    picked = torch.gather(logits, -1, target_ids[..., None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def head_target_stats(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (differentiable) and entropy (detached) of each target from the hidden state at its predicting
    position, through the LM ``head``: (..., H), (...) -> (...), (...). The same tempered quantities as
    :func:`target_logprobs` and :func:`distribution_entropy` of ``head(hidden)``.

    The full-vocabulary logits (a 150k vocabulary: 0.6 MB per position in fp32, more with the softmax and its
    gradient) exist for at most ``chunk`` positions at a time, in the forward and in the backward: with gradients
    on and more than one chunk, each chunk is checkpointed (its logits are recomputed for its backward, one head
    matmul more). ``None``: one chunk of every position.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1)
    size = max(chunk or flat_targets.numel(), 1)
    # One chunk holds its logits once either way (the head is the forward's last op): no recomputation then.
    recompute = torch.is_grad_enabled() and flat_hidden.requires_grad and flat_targets.numel() > size
    logprobs, entropies = [], []
    for start in range(0, flat_targets.numel(), size):
        part = (head, flat_hidden[start : start + size], flat_targets[start : start + size], temperature)
        if recompute:
            logprob, entropy = torch.utils.checkpoint.checkpoint(_head_chunk, *part, use_reentrant=False)
        else:
            logprob, entropy = _head_chunk(*part)
        logprobs.append(logprob)
        entropies.append(entropy)
    if not logprobs:  # no positions at all
        empty = flat_hidden.new_zeros(
            target_ids.shape, dtype=torch.promote_types(hidden.dtype, torch.float32)
        )
        return empty, empty
    return torch.cat(logprobs).reshape(target_ids.shape), torch.cat(entropies).reshape(target_ids.shape)


def _head_chunk(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _upcast(head(hidden))
    if temperature != 1.0:
        logits = logits / temperature
    normaliser = torch.logsumexp(logits, dim=-1)
    logprob = torch.gather(logits, -1, targets[:, None]).squeeze(-1) - normaliser
    with torch.no_grad():  # H = -sum p log p = logsumexp - sum p * logit
        entropy = normaliser - torch.softmax(logits, dim=-1).mul_(logits).sum(-1)
    return logprob, entropy


def distribution_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the tempered next-token distribution."""
    logp = torch.log_softmax(_upcast(logits) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution, aligned like :func:`token_logprobs`."""
    return torch.nn.functional.pad(distribution_entropy(logits[:, :-1], temperature), (1, 0), value=0.0)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1/k2/k3)."""
    log_ratio = ref_logprobs - logprobs  # log(pi_ref / pi_theta)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl_estimator={estimator!r}; expected one of {KL_ESTIMATORS}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token_mean") -> torch.Tensor:
    """Masked mean of (B, T) values: over all tokens (``token_mean``) or per row then over rows
    (``seq_mean_token_mean``, original GRPO). Rows without loss tokens are ignored; all-empty gives 0."""
    if loss_agg == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_agg == "seq_mean_token_mean":
        per_row_count = mask.sum(-1)
        per_row = (values * mask).sum(-1) / per_row_count.clamp(min=1.0)
        has = (per_row_count > 0).float()
        return (per_row * has).sum() / has.sum().clamp(min=1.0)
    raise ValueError(f"loss_agg={loss_agg!r}; expected one of {LOSS_AGGS}")


def truncated_is_weights(
    learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights for a sampler that is not the learner (e.g. vLLM), per token:
    ``min(pi_learner / pi_sampler, cap) = min(exp(learner - sampler), cap)``, detached. (B, T) -> (B, T).

    TRL's ``vllm_importance_sampling_correction`` and verl's token-level TIS: the policy-gradient loss of each
    token is multiplied by this weight, ``learner_logprobs`` being the learner's log-probs under the weights the
    sampler sampled with (pi_old). Truncation bounds the variance where the sampler under-rates a token.
    """
    return torch.exp(learner_logprobs.detach() - sampler_logprobs).clamp(max=cap)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    weights: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate plus KL to a reference policy, aggregated over masked tokens.

    Per token: ``-w min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + kl_coef * KL``, rho = exp(logp - old),
    w = ``is_weights`` (detached, e.g. :func:`truncated_is_weights`; 1 when None).
    All inputs (B, T); ``ref_logprobs`` is required when ``kl_coef > 0``. With ``weights`` (B, T) the
    aggregation is the weighted sum instead of ``loss_agg`` (weights that already hold the normalisation of a
    whole minibatch, packing.loss_weights, so that micro-batches and learners can sum their parts).
    Returns the scalar loss and detached stats: policy_loss, kl, clip_frac (share of tokens where the clipped
    term was the smaller one), approx_kl (k3 of pi_old vs pi_theta), ratio_mean.
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        pg = pg * is_weights.detach()

    def agg(values: torch.Tensor) -> torch.Tensor:
        return aggregate(values, mask, loss_agg) if weights is None else (values * weights).sum()

    pg_loss = agg(pg)
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs (log-probs of the reference model)")
        kl = agg(kl_penalty(logprobs, ref_logprobs, kl_estimator))
    else:
        kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    loss = pg_loss + kl_coef * kl

    with torch.no_grad():
        count = mask.sum().clamp(min=1.0)
        stats = {
            "policy_loss": pg_loss.detach(),
            "kl": kl.detach(),
            "clip_frac": ((clipped < unclipped).to(mask.dtype) * mask).sum() / count,
            "approx_kl": ((torch.exp(-log_ratio) + log_ratio - 1.0) * mask).sum() / count,
            "ratio_mean": (ratio * mask).sum() / count,
        }
    return loss, stats
