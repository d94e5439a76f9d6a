"""One TreeRPO iteration without Ray: what the RLlib adapters and every benchmark replica call.

- sampling: :func:`sample_iteration` draws prompts from an env and grows their trees (sampler.py);
- packs: :func:`training_packs` turns trees into advantages and training packs (rows.py, packing.py) with a
  config's settings;
- minibatches: :func:`minibatches` splits an iteration's packs into ``num_minibatches`` optimizer steps per epoch
  of about equal loss tokens (every loss token exactly once per epoch, SPEC.md s.4), whatever the tree shape, each
  collated with loss weights that hold the whole minibatch's normalisation, so micro-batches and learners just
  add their parts; :func:`micro_batches` splits a minibatch into forwards of at most ``forward_tokens`` tokens;
- the loss: :func:`compute_loss` goes from the loss tokens' log-probs (packing.packed_target_stats: the LM head
  at the predicting positions only, ``logits_chunk`` of them at a time) and the reference model's to the clipped
  surrogate of losses.py plus the stats the learner logs;
- :func:`policy_update` is the whole learner update (per minibatch: forward and backward per micro-batch under
  the config's precision (precision.compute_context), global-norm clip, AdamW step) for drivers without Ray. The RLlib learner runs the same steps through RLlib's
  Learner: tests/test_iteration.py checks that both give the same parameters from the same packs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rllib_treerpo.losses import policy_loss, truncated_is_weights
from rllib_treerpo.packing import Pack, collate, loss_weights, packed_target_stats
from rllib_treerpo.precision import compute_context, resolve_config_dtype
from rllib_treerpo.rows import build_training_batch
from rllib_treerpo.sampler import TreeSpec, draw_prompts, grow_trees
from rllib_treerpo.tree import Tree


def sampling_seed(seed: int | None, worker_index: int, call: int) -> int:
    """The seed of an env runner's ``call``-th sample(): distinct per (config seed, runner, call), reproducible."""
    return int(np.random.SeedSequence([seed or 0, worker_index, call]).generate_state(1)[0])


def minibatch_seed(seed: int | None, iteration: int) -> int:
    """The seed that shuffles iteration ``iteration``'s packs into minibatches (a resumed run replays it)."""
    return int(np.random.SeedSequence([seed or 0, iteration, 17]).generate_state(1)[0])


def sample_iteration(
    env: Any, backend: Any, tokenizer: Any, spec: TreeSpec, num_prompts: int, seed: int
) -> list[Tree]:
    """``num_prompts`` trees: prompts drawn from ``env`` with ``seed``, grown with ``spec`` (its seed: ``seed``)."""
    roots = draw_prompts(env, num_prompts, seed)
    return grow_trees(roots, backend, tokenizer, spec.with_seed(seed))


def training_packs(trees: list[Tree], config: Any) -> tuple[list[Pack], dict[str, float]]:
    """Advantages and packs of an iteration's trees with a config's tau, advantage_std, value_estimate, eps and
    layout (``packing``: packed subtrees, else one row per node) and ``pack_tokens``."""
    return build_training_batch(
        trees,
        tau=config.tau,
        advantage_std=config.advantage_std,
        value_estimate=config.value_estimate,
        eps=config.advantage_eps,
        layout="packed" if config.packing else "rows",
        pack_tokens=config.pack_tokens,
    )


def minibatch_plan(
    packs: list[Pack], num_minibatches: int, *, num_epochs: int = 1, shuffle: bool = True, seed: int = 0
) -> list[list[int]]:
    """Pack indices of each minibatch: every pack once per epoch, in ``num_minibatches`` parts of about equal loss
    tokens (fewer when there are fewer packs). Shuffled per epoch with a generator seeded by ``seed``."""
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


def minibatches(
    packs: list[Pack], config: Any, pad_id: int, *, seed: int, num_learners: int = 1
) -> list[dict[str, np.ndarray]]:
    """The collated minibatches of one update: ``config.num_minibatches`` per ``config.num_epochs``, each padded to
    a multiple of ``num_learners`` rows (empty rows weigh 0), so every learner gets a shard of every minibatch and
    takes the same number of optimizer steps (uneven shards hang DDP)."""
    out = []
    for index in minibatch_plan(packs, config.num_minibatches, num_epochs=config.num_epochs, seed=seed):
        chosen = [packs[i] for i in index]
        rows = -(-len(chosen) // num_learners) * num_learners
        out.append(collate(chosen, loss_weights(chosen, config.loss_agg), pad_id, pad_to=rows))
    return out


def micro_batches(batch: dict[str, Any], forward_tokens: int | None) -> list[dict[str, Any]]:
    """Split a collated minibatch (arrays or tensors) into forwards of at most ``forward_tokens`` padded tokens
    (rows x longest row; one row can exceed it), each trimmed to its own longest row, node count and targets."""
    length = (batch["token_node"] >= 0).sum(1).tolist()
    order = sorted(range(len(length)), key=lambda r: length[r])
    groups, current = [], []
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


@dataclass(frozen=True)
class LossSettings:
    """The objective's knobs (SPEC.md s.4); ``from_config`` reads them from any object with these attributes."""

    temperature: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    tis_cap: float | None = None

    @classmethod
    def from_config(cls, config: Any) -> LossSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def compute_loss(
    logprobs: torch.Tensor,
    batch: dict[str, torch.Tensor],
    settings: LossSettings,
    ref_logprobs: torch.Tensor | None = None,
    scale: float = 1.0,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The TreeRPO loss of one (micro-)batch of packs from the policy's log-probs of its loss tokens.

    ``logprobs`` (B, M) and ``entropy`` (B, M, for the stats) as packing.packed_target_stats returns them at
    ``settings.temperature``; ``batch`` holds the collated packs (advantages, old_logprobs, loss_weight: (B, M));
    ``ref_logprobs`` (B, M) are the frozen reference model's, needed when ``settings.kl_coef > 0``. The loss is
    the weighted sum (the weights carry the minibatch's normalisation) times ``scale`` (the number of learners: DDP averages their gradients). Returns the loss and
    float stats: policy_loss, kl, clip_frac, approx_kl, ratio_mean, entropy, total, logprob_mismatch (mean
    |learner - sampler log-prob| over loss tokens: before the iteration's first optimizer step, the sampler/learner
    numerical mismatch, e.g. vLLM vs transformers), and with ``settings.tis_cap`` tis_weight_mean.

    With ``tis_cap`` (one optimizer step per iteration, so the current policy IS the one that sampled) the ratio is
    taken against the learner's own detached log-probs and each token is weighted by
    ``min(pi_learner / pi_sampler, tis_cap)`` (losses.truncated_is_weights), as TRL and verl correct for vLLM.
    """
    weights = batch["loss_weight"]
    mask = (weights > 0).to(torch.float32)
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
        weights=weights.to(logprobs.dtype),
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


def target_stats(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], config: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed forward with the config's attention, temperature and logits chunk (packing.packed_target_stats)."""
    return packed_target_stats(
        model, batch, config.pack_attention, config.temperature, getattr(config, "logits_chunk", None)
    )


def as_tensors(batch: dict[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    packs: list[Pack],
    config: Any,
    *,
    pad_id: int = 0,
    seed: int = 0,
    ref_model: torch.nn.Module | None = None,
) -> list[dict[str, float]]:
    """One learner update without Ray, as the RLlib learner runs it: per minibatch, per micro-batch the packed
    forward (autocast to ``config.dtype`` when the model's parameters are float32 masters, precision.py),
    :func:`compute_loss` and backward; then clip (``config.grad_clip``), step and free the gradients. Returns
    per-minibatch stats (the last micro-batch's, plus grad_norm)."""
    device = next(model.parameters()).device
    dtype = resolve_config_dtype(config, None) if hasattr(config, "dtype") else "float32"
    params = [p for p in model.parameters() if p.requires_grad]
    settings = LossSettings.from_config(config)
    out = []
    model.train()
    for batch in minibatches(packs, config, pad_id, seed=seed):
        optimizer.zero_grad(set_to_none=True)
        for part in micro_batches(as_tensors(batch, device), config.forward_tokens):
            ref_logprobs = None
            if ref_model is not None and settings.kl_coef > 0:
                with torch.no_grad(), compute_context(ref_model, dtype):
                    ref_logprobs, _ = target_stats(ref_model, part, config)
            with compute_context(model, dtype):
                logprobs, entropy = target_stats(model, part, config)
            loss, stats = compute_loss(logprobs, part, settings, ref_logprobs, entropy=entropy)
            loss.backward()
        if config.grad_clip:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(stats)
    model.eval()
    return out
