"""The generation interface every backend implements (docs/architecture.md, ``generation/``).

A backend turns token-id contexts into sampled continuations with per-token log-probs. The interface is
plain token ids, like vLLM with automatic prefix caching: the tree sampler hands back, as the contexts of
level k + 1, exactly the full sequences (context + new tokens) of the samples returned at level k, and a
backend that keeps their KV caches continues from them instead of re-encoding the shared prefix.

Log-prob convention (the learner must recompute the same quantity, to 1e-4):
  ``logprob[t] = log_softmax(logits_t.float() / temperature)[token_t]``, i.e. the log-prob of the sampled
  token under the tempered distribution over the FULL vocabulary. Top-k / top-p only decide which tokens may
  be drawn; they are not renormalised into the returned log-prob. For greedy decoding (temperature 0) the
  log-prob is taken at temperature 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

FinishReason = Literal["eos", "delimiter", "length"]


class MissingExtraError(ImportError):
    """A chosen backend needs an optional extra that is not installed (the message names the pip command)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one batch of continuations.

    ``temperature == 0`` means greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable truncation.
    ``stop_strings``: a continuation ends at the first token after which its decoded new text contains one
    of them (that token included), e.g. ``("\\n",)`` for one line per reasoning step.
    ``seed``: a fixed seed makes a call deterministic (same contexts, same params -> same samples).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_at_eos: bool = True
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if isinstance(self.stop_strings, str):
            raise TypeError("stop_strings must be a tuple of strings, not a single string")
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop_strings may not contain an empty string: {self.stop_strings!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Sample:
    """One sampled continuation: its new tokens only (not the context)."""

    token_ids: list[int]
    logprobs: list[float]  # see the module docstring for exactly which log-prob
    finish_reason: FinishReason


@dataclass
class GenerationStats:
    """Counters since the last ``reset_stats()``.

    tokens_fed: real (non-padding) tokens pushed through the model: prefill + decode inputs.
    prefill_tokens: the part of tokens_fed that was context (prompt, or a continuation's uncached tail).
    decode_tokens: tokens sampled and returned (each ``Sample.token_ids`` entry counts once).
    pad_tokens: padding positions and finished rows that were computed anyway (wasted work).
    cache_hits / cache_misses: contexts that continued from a kept KV cache / had to be prefilled.
    """

    tokens_fed: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    pad_tokens: int = 0
    forward_calls: int = 0
    generate_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    seconds: float = 0.0  # wall time inside generate()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GenerationBackend(ABC):
    """Samples continuations of token-id contexts. Implementations: ``hf`` (reference), ``vllm`` (GPU)."""

    name: str = "base"
    window_name: str = "max_position_embeddings"  # what bounds max_length (vllm: the engine's max_model_len)

    def __init__(self) -> None:
        self.stats = GenerationStats()

    @abstractmethod
    def generate(
        self, contexts: Sequence[Sequence[int]], num_samples: int | Sequence[int], params: SamplingParams
    ) -> list[list[Sample]]:
        """Sample ``num_samples`` (one int for all, or one per context) continuations of every context.

        Returns one list per context, in order, with that context's samples.
        """

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str, tokenizer: Any, *, dtype: str = "float32", **kwargs: Any
    ) -> GenerationBackend:
        """A backend that loads its model from a Hugging Face folder or hub name (as env runners do)."""
        raise NotImplementedError(f"the {cls.name} backend cannot load a model by itself")

    @abstractmethod
    def load_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Take new policy weights under Hugging Face names (pushed from the learner); invalidates every kept
        KV cache. The only way weights reach a backend."""

    def drop_weights(self) -> bool:
        """Free the memory of the weights until the next ``load_weights`` (which must bring every one back);
        returns whether anything was freed. For a sampler that shares its process with the learner: its copy
        is not needed while the learner updates (gradients and logits take the room), and the weight sync
        after the update refills it. Default: nothing freed."""
        return False

    def weights(self) -> dict[str, Any]:
        """The weights the backend samples with, under Hugging Face names (for a restarted env runner)."""
        raise NotImplementedError(f"the {self.name} backend cannot export its weights")

    @abstractmethod
    def clear_cache(self) -> None:
        """Drop every kept KV cache (the next call prefills everything)."""

    def release(self) -> None:
        """Free what the backend holds on the device until its next call (caches; vllm with sleep mode: the
        engine sleeps). A later ``generate`` or ``load_weights`` takes back what it needs."""
        self.clear_cache()

    def reset_stats(self) -> None:
        self.stats = GenerationStats()

    @property
    def max_length(self) -> int | None:
        """The longest sequence (context + new tokens) the model accepts, or None if unbounded/unknown."""
        return None

    # ----------------------------------------------------------------- helpers for implementations
    def _check_contexts(self, contexts: Sequence[Sequence[int]], max_new: int) -> None:
        """Every context is non-empty and fits the model window together with ``max_new`` new tokens."""
        window = self.max_length
        for i, context in enumerate(contexts):
            if not context:
                raise ValueError(f"context {i} is empty; a context needs at least one token")
            if window is not None and len(context) + max_new > window:
                raise ValueError(
                    f"context {i} has {len(context)} tokens; with max_new_tokens={max_new} that is "
                    f"{len(context) + max_new} > the model window {self.window_name}={window}"
                )

    @staticmethod
    def _expand_num_samples(num_samples: int | Sequence[int], n_contexts: int) -> list[int]:
        """One count per context; validates the shape and values."""
        if isinstance(num_samples, int):
            counts = [num_samples] * n_contexts
        else:
            counts = [int(n) for n in num_samples]
            if len(counts) != n_contexts:
                raise ValueError(f"num_samples has {len(counts)} entries for {n_contexts} contexts")
        bad = [n for n in counts if n < 0]
        if bad:
            raise ValueError(f"num_samples must be >= 0, got {bad[0]}")
        return counts


class StopStringChecker:
    """Incremental stop-string detection for token streams, one stream per sample row.

    A row stops at the first token after which its decoded new text contains a stop string. Only the last
    ``window`` tokens are decoded (longest stop string in bytes + 1): every token decodes to at least one
    byte, so an occurrence completed by the newest token lies inside the window, and an earlier occurrence
    would have stopped the row already. One batched decode per step, whatever the text length. (Caveat: a
    tokenizer whose decode of a token suffix is not a suffix of the full text, e.g. SentencePiece dropping a
    leading space, can miss a stop string that starts with that space.)
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], n_rows: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = max(len(s.encode("utf-8")) for s in self.stops) + 1
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]

    def push(self, rows: Sequence[int], tokens: Sequence[int]) -> list[bool]:
        """Append ``tokens[i]`` to row ``rows[i]``; per row: does its text now contain a stop string?"""
        for row, token in zip(rows, tokens, strict=True):
            self.tokens[row].append(int(token))
        if not rows:
            return []
        texts = self.tokenizer.batch_decode(
            [self.tokens[r][-self.window :] for r in rows], skip_special_tokens=False
        )
        return [any(s in text for s in self.stops) for text in texts]
