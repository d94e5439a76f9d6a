"""The policy's forward over training packs: from collated packs to each loss token's log-prob and entropy.

One pass: the decoder over the packed tokens with the tree structure (segment attention, tree_attention.py, or
a dense tree mask), the final hidden states gathered at the positions that predict the loss tokens, then the
LM head there only (:func:`head_target_stats`): in one block where the fp32 (M, V) logits are small, else
``logits_chunk`` positions at a time, each recomputed in the backward. :func:`target_stats` is that pass
under the config's precision (precision.compute_context): what the RLlib module, the reference model and the
Ray-free update (update.py) all call.

Log-probs are tempered (logits / temperature) so that rho = pi_theta / pi_old compares the distribution the
sampler drew from. :func:`token_logprobs` and :func:`token_entropy` are the same quantities from
whole-sequence logits (the per-row reference the tests and the PPO baseline compare with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

from rllib_treerpo.learner.precision import compute_context, resolve_config_dtype
from rllib_treerpo.learner.tree_attention import segment_plan, using_segments

ATTENTIONS = ("segments", "dense")

# Most bytes of one forward's fp32 logits block (positions x vocabulary) computed at once: above it the LM
# head runs in ``logits_chunk`` chunks, each recomputed in the backward (one head matmul more). 64 MiB is 341
# positions of SmolLM2's 49,152-token vocabulary: its learner chunks as before; a 99-token vocabulary never
# chunks (there the chunks and their recomputation cost time and save nothing). The softmax and its gradient
# hold about two more blocks of the same size while a block's backward runs.
LOGITS_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ForwardSettings:
    """How the learner's forward runs, read from a config once (:meth:`from_config`)."""

    attention: str  # one of ATTENTIONS
    temperature: float
    logits_chunk: int | None
    dtype: str  # the compute dtype (autocast target under mixed precision)

    @classmethod
    def from_config(cls, config: Any) -> ForwardSettings:
        return cls(
            attention=config.pack_attention,
            temperature=config.temperature,
            logits_chunk=config.logits_chunk,
            dtype=resolve_config_dtype(config, None),  # dtype auto: resolved once, in place
        )


def target_stats(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], settings: ForwardSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) tempered log-prob of each loss token (differentiable) and (B, M) entropy (detached) of its
    next-token distribution, under the settings' precision: the whole forward the loss needs."""
    with compute_context(model, settings.dtype):
        hidden = packed_hidden(model, batch, settings.attention)
        return head_target_stats(
            model.get_output_embeddings(),
            hidden,
            batch["target_ids"],
            settings.temperature,
            settings.logits_chunk,
        )


def tree_attention_mask(token_node: torch.Tensor, node_parent: torch.Tensor) -> torch.Tensor:
    """(B, L) local node per token (-1: padding), (B, N) local parents -> (B, 1, L, L) bool, True = attend.

    Token i attends to token j iff j <= i and j's node is i's node or one of its ancestors. A padding token
    attends to itself only (a row with nothing to attend to would give NaN in attention).
    """
    b, n = node_parent.shape
    device = node_parent.device
    # ancestor[b, node, a]: a is node or one of its ancestors
    ancestor = torch.eye(n, dtype=torch.bool, device=device).expand(b, n, n).clone()
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


def packed_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], attention: str) -> torch.Tensor:
    """(B, M, H) final hidden states at the positions that predict each loss token (the LM head's inputs).

    ``attention="segments"`` (tree_attention.py): each node's tokens against their own path's keys, no masked
    work; ``"dense"``: one 4D tree mask for the model's attention (sdpa takes it as is; eager/flex get it
    additive). Either way the tree structure is always passed: given no mask and position ids that do not
    increase by one, transformers infers "packed documents" and builds a wrong mask silently (the packing
    tests show it).
    """
    decoder = model.get_decoder()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if attention == "segments":
        with using_segments(model):
            plan = segment_plan(batch["token_node"], batch["node_parent"])
            # The plan travels as a model kwarg, which reaches every attention call: a mask argument does
            # not reach it in every model (Llama's create_causal_mask turns one it does not know into None).
            hidden = decoder(**inputs, segment_plan=plan).last_hidden_state
    elif attention == "dense":
        mask = tree_attention_mask(batch["token_node"], batch["node_parent"])
        if model.config._attn_implementation != "sdpa":  # eager/flex: the mask is additive
            mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(model.dtype).min
            )
        hidden = decoder(**inputs, attention_mask=mask).last_hidden_state
    else:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTIONS}")
    index = batch["target_pos"][..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def packed_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], attention: str) -> torch.Tensor:
    """(B, M, V) logits at the positions that predict each loss token (for tests and benchmarks: the
    learner never builds this block, it goes through :func:`head_target_stats`)."""
    return model.get_output_embeddings()(packed_hidden(model, batch, attention))


def logits_chunk_size(
    positions: int, vocab: int, chunk: int | None, bound_bytes: int = LOGITS_BLOCK_BYTES
) -> int:
    """Positions per LM-head call: all of them while their fp32 logits (positions x vocab x 4 bytes) fit in
    ``bound_bytes``, else ``chunk`` (None: all of them whatever the size)."""
    if chunk is None or positions * vocab * 4 <= bound_bytes:
        return max(positions, 1)
    return max(chunk, 1)


def head_target_stats(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float,
    chunk: int | None,
    bound_bytes: int = LOGITS_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (differentiable) and entropy (detached) of each target from the hidden state at its predicting
    position, through the LM ``head``: (..., H), (...) -> (...), (...). The same tempered quantities as
    :func:`target_logprobs` and :func:`distribution_entropy` of ``head(hidden)``.

    When the fp32 logits of all positions would exceed ``bound_bytes`` (large for a 150k vocabulary, more with
    the softmax and its gradient), they exist for at most ``chunk`` positions at a time, in the forward and in
    the backward: with gradients on and more than one chunk, each chunk is checkpointed (its logits are
    recomputed for its backward, one head matmul more). Below the bound (or ``chunk`` None): one block.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1)
    size = logits_chunk_size(flat_targets.numel(), _vocab_size(head), chunk, bound_bytes)
    # One chunk holds its logits once either way (the head is the forward's last op): no recomputation then.
    recompute = torch.is_grad_enabled() and flat_hidden.requires_grad and flat_targets.numel() > size
    logprobs = []
    entropies = []
    for start in range(0, flat_targets.numel(), size):
        part = (head, flat_hidden[start : start + size], flat_targets[start : start + size], temperature)
        if recompute:
            logprob, entropy = torch.utils.checkpoint.checkpoint(_head_chunk, *part, use_reentrant=False)
        else:
            logprob, entropy = _head_chunk(*part)
        logprobs.append(logprob)
        entropies.append(entropy)
    if not logprobs:  # no positions at all
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        empty = flat_hidden.new_zeros(target_ids.shape, dtype=dtype)
        return empty, empty
    return torch.cat(logprobs).reshape(target_ids.shape), torch.cat(entropies).reshape(target_ids.shape)


def _vocab_size(head: torch.nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(head.out_features)


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


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for softmax arithmetic; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def target_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each target under logits already taken at its predicting position: (B, M, V), (B, M) ->
    (B, M). Computed as gathered logit minus logsumexp, without a (B, M, V) log-softmax."""
    logits = _upcast(logits) / temperature
    picked = torch.gather(logits, -1, target_ids[..., None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each token of whole sequences: (B, T, V) logits, (B, T) ids -> (B, T); position t holds
    token t's (predicted from logits at t - 1), position 0 gets 0."""
    out = target_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return torch.nn.functional.pad(out, (1, 0), value=0.0)


def distribution_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the tempered next-token distribution."""
    logp = torch.log_softmax(_upcast(logits) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution, aligned like :func:`token_logprobs`."""
    return torch.nn.functional.pad(distribution_entropy(logits[:, :-1], temperature), (1, 0), value=0.0)
