"""One TreeRPO iteration without Ray: what the RLlib adapters and every benchmark replica call.

- sampling: :func:`sample_iteration` draws prompts from an env and grows their trees (sampler.py);
- rows: :func:`training_rows` turns trees into advantages and training rows (rows.py) with a config's settings;
- minibatches: :func:`minibatch_plan` splits the rows of one iteration so that every row is trained exactly once
  per epoch (SPEC.md s.4);
- the loss: :func:`compute_loss` goes from the policy's logits (and the reference model's, for the KL term) to the
  clipped surrogate of losses.py plus the stats the learner logs;
- :func:`policy_update` is the whole learner update (forward, loss, backward, global-norm clip, AdamW step per
  minibatch) for drivers without Ray. The RLlib learner runs the same steps through RLlib's Learner (the same
  :func:`compute_loss`, RLlib's clipping and the optimizer it registers): tests/test_iteration.py checks that both
  give the same parameters from the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rllib_treerpo.losses import policy_loss, token_entropy, token_logprobs, truncated_is_weights
from rllib_treerpo.rows import build_training_batch
from rllib_treerpo.sampler import TreeSpec, draw_prompts, grow_trees
from rllib_treerpo.tree import Tree


def sampling_seed(seed: int | None, worker_index: int, call: int) -> int:
    """The seed of an env runner's ``call``-th sample(): distinct per (config seed, runner, call), reproducible."""
    return int(np.random.SeedSequence([seed or 0, worker_index, call]).generate_state(1)[0])


def minibatch_seed(seed: int | None, iteration: int) -> int:
    """The seed that shuffles iteration ``iteration``'s rows into minibatches (a resumed run replays it)."""
    return int(np.random.SeedSequence([seed or 0, iteration, 17]).generate_state(1)[0])


def sample_iteration(
    env: Any, backend: Any, tokenizer: Any, spec: TreeSpec, num_prompts: int, seed: int
) -> list[Tree]:
    """``num_prompts`` trees: prompts drawn from ``env`` with ``seed``, grown with ``spec`` (its seed: ``seed``)."""
    roots = draw_prompts(env, num_prompts, seed)
    return grow_trees(roots, backend, tokenizer, spec.with_seed(seed))


def training_rows(
    trees: list[Tree], config: Any, pad_id: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Advantages and rows of an iteration's trees with a config's tau, advantage_std, value_estimate and eps."""
    return build_training_batch(
        trees,
        tau=config.tau,
        advantage_std=config.advantage_std,
        value_estimate=config.value_estimate,
        eps=config.advantage_eps,
        pad_id=pad_id,
    )


@dataclass(frozen=True)
class LossSettings:
    """The objective's knobs (SPEC.md s.4); ``from_config`` reads them from any object with these attributes."""

    temperature: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "token_mean"
    tis_cap: float | None = None

    @classmethod
    def from_config(cls, config: Any) -> LossSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def compute_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    settings: LossSettings,
    ref_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The TreeRPO loss of one minibatch from the policy's logits (B, T, V).

    ``batch`` holds the rows of :func:`rllib_treerpo.rows.build_training_batch` as tensors (input_ids,
    loss_mask, advantages, old_logprobs: (B, T)); ``ref_logits`` (B, T, V) are the frozen reference model's, needed
    when ``settings.kl_coef > 0``. Returns the scalar loss and float stats: policy_loss, kl, clip_frac, approx_kl,
    ratio_mean, entropy, total, logprob_mismatch (mean |learner - sampler log-prob| over loss tokens: before the
    iteration's first optimizer step, the sampler/learner numerical mismatch, e.g. vLLM vs transformers), and with
    ``settings.tis_cap`` tis_weight_mean.

    With ``tis_cap`` (one optimizer step per iteration, so the current policy IS the one that sampled) the ratio is
    taken against the learner's own detached log-probs and each token is weighted by
    ``min(pi_learner / pi_sampler, tis_cap)`` (losses.truncated_is_weights), as TRL and verl correct for vLLM.
    """
    input_ids, mask = batch["input_ids"], batch["loss_mask"]
    logprobs = token_logprobs(logits, input_ids, settings.temperature)
    ref_logprobs = None if ref_logits is None else token_logprobs(ref_logits, input_ids, settings.temperature)
    old, is_weights = batch["old_logprobs"], None
    if settings.tis_cap is not None:
        is_weights = truncated_is_weights(logprobs, old, settings.tis_cap)
        old = logprobs.detach()
    loss, stats = policy_loss(
        logprobs,
        old,
        batch["advantages"],
        mask,
        eps_low=settings.clip_eps_low,
        eps_high=settings.clip_eps_high,
        ref_logprobs=ref_logprobs,
        kl_coef=settings.kl_coef,
        kl_estimator=settings.kl_estimator,
        loss_agg=settings.loss_agg,
        is_weights=is_weights,
    )
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        entropy = (token_entropy(logits, settings.temperature) * mask).sum() / count
        mismatch = ((logprobs - batch["old_logprobs"]).abs() * mask).sum() / count
    out = {name: float(value) for name, value in stats.items()}
    out.update(entropy=float(entropy), total=float(loss.detach()), logprob_mismatch=float(mismatch))
    if is_weights is not None:
        out["tis_weight_mean"] = float((is_weights * mask).sum() / count)
    return loss, out


def minibatch_plan(
    num_rows: int, minibatch_size: int | None, *, num_epochs: int = 1, shuffle: bool = True, seed: int = 0
) -> list[np.ndarray]:
    """Row indices of each minibatch: every row exactly once per epoch, in ``ceil(rows / minibatch_size)`` parts.

    ``minibatch_size`` None: the whole batch per epoch. With ``shuffle`` each epoch is permuted with a generator
    seeded by ``seed`` (so a resumed run replays the same minibatches).
    """
    rng = np.random.default_rng(seed)
    size = num_rows if not minibatch_size else minibatch_size
    plan = []
    for _ in range(num_epochs):
        order = rng.permutation(num_rows) if shuffle else np.arange(num_rows)
        plan += [order[start : start + size] for start in range(0, num_rows, max(size, 1))]
    return plan


def as_tensors(
    rows: dict[str, np.ndarray], index: np.ndarray | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Rows (numpy) -> tensors on ``device``, optionally only the rows at ``index``."""
    return {k: torch.as_tensor(v if index is None else v[index], device=device) for k, v in rows.items()}


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, V) logits of a transformers causal LM on padded rows (the RLModule's training forward)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: dict[str, np.ndarray],
    settings: LossSettings,
    *,
    minibatch_size: int | None = None,
    num_epochs: int = 1,
    grad_clip: float | None = 1.0,
    shuffle: bool = True,
    seed: int = 0,
    ref_model: torch.nn.Module | None = None,
) -> list[dict[str, float]]:
    """One learner update without Ray: per minibatch forward, :func:`compute_loss`, backward, clip, step.

    Returns the stats of every minibatch. What the RLlib learner does with the same rows and settings.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    model.train()
    for index in minibatch_plan(
        len(rows["input_ids"]), minibatch_size, num_epochs=num_epochs, shuffle=shuffle, seed=seed
    ):
        batch = as_tensors(rows, index, device)
        ref_logits = None
        if ref_model is not None and settings.kl_coef > 0:
            with torch.no_grad():
                ref_logits = model_logits(ref_model, batch)
        loss, stats = compute_loss(model_logits(model, batch), batch, settings, ref_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        optimizer.step()
        out.append(stats)
    model.eval()
    return out
