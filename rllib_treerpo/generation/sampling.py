"""One decode step of a backend's loop: a token per row under the log-prob convention of base.py, and the rows
that it finishes (torch; imported by backends that need it)."""

from __future__ import annotations

import torch

from .base import SamplingParams, StopStringChecker


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits (B, V) -> tokens (B,) int64, log-probs (B,) float32.

    The log-prob is log_softmax(logits / T) at the token, over the full vocabulary (T = 1 for greedy): top-k
    and top-p restrict what may be drawn but are not renormalised into it (base.py's convention).
    """
    scaled = logits.float()
    if not params.greedy and params.temperature != 1.0:
        scaled = scaled / params.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if params.greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        filtered = logp
        if 0 < params.top_k < logp.shape[-1]:
            kth = torch.topk(filtered, params.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf")).log_softmax(dim=-1)  # then top-p
        if params.top_p < 1.0:
            sorted_lp, order = torch.sort(filtered, dim=-1, descending=True)
            probs = sorted_lp.exp()
            # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
            drop = (probs.cumsum(dim=-1) - probs) > params.top_p
            sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
            filtered = torch.full_like(filtered, float("-inf")).scatter(-1, order, sorted_lp)
        tokens = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def finished_rows(
    tokens: torch.Tensor,
    done: torch.Tensor,
    alive: list[int],
    stops: StopStringChecker | None,
    params: SamplingParams,
    step: int,
    eos: torch.Tensor,
) -> tuple[list[int], list[bool], list[bool]]:
    """Batch positions that finish with this step's ``tokens`` (B,), and per position: EOS hit, delimiter hit.

    ``done`` (B,) bool: rows finished earlier (still in the batch); ``alive``: each position's sample row (the
    stop-string checker's index); ``eos`` (E,): the ids that end a sample when ``params.stop_at_eos``.
    """
    if params.stop_at_eos:  # one device->host transfer per step for both flags
        done_cpu, eos_hit = torch.stack([done, torch.isin(tokens, eos) & ~done]).tolist()
    else:
        done_cpu = done.tolist()
        eos_hit = [False] * len(alive)
    delim_hit = [False] * len(alive)
    if stops is not None:
        live = [b for b, d in enumerate(done_cpu) if not d]
        tok_list = tokens.tolist()
        hits = stops.push([alive[b] for b in live], [tok_list[b] for b in live])
        for b, hit in zip(live, hits, strict=True):
            delim_hit[b] = hit
    last = step == params.max_new_tokens - 1
    newly = [b for b in range(len(alive)) if not done_cpu[b] and (eos_hit[b] or delim_hit[b] or last)]
    return newly, eos_hit, delim_hit
