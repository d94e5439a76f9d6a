"""The computing half of tests/fakes/fake_vllm.py: requests decoded by a real (tiny) transformers model,
prefix-cache bookkeeping, and the worker that ``collective_rpc`` reaches. Which vLLM 0.32.0 behaviour each
part copies is listed in fake_vllm's docstring."""

from __future__ import annotations

import copy
from typing import Any

import torch

from tests.fakes.fake_vllm import (
    _SAMPLING_EPS,
    MODELS,
    CompletionOutput,
    Logprob,
    RequestOutput,
    SamplingParams,
)

_BLOCK_SIZE = 16  # prefix caching reuses full KV blocks


class Engine:
    """Runs the requests of one fake ``LLM`` (its model, tokenizer, model_config and prefix cache)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._cached: set[tuple[int, ...]] = set()  # full-block prefixes in the prefix cache
        self._request_counter = 0

    def reset_prefix_cache(self) -> None:
        self._cached.clear()

    def request(self, prompt: Any, sp: SamplingParams) -> RequestOutput:
        if not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            raise TypeError(f"the fake engine takes TokensPrompt dicts only, got {type(prompt).__name__}")
        ids = [int(t) for t in prompt["prompt_token_ids"]]
        if len(ids) >= self.llm.model_config.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens >= max_model_len {self.llm.model_config.max_model_len}"
            )
        if sp.top_k not in (0, -1) or sp.top_p != 1.0 or sp.min_p:
            raise NotImplementedError("the fake engine does not model top-k / top-p / min-p")
        cached = self._cached_tokens(ids)
        outputs = self._decode(ids, sp)
        for out in outputs:
            self._remember(ids + list(out.token_ids))
        self._request_counter += 1
        return RequestOutput(
            str(self._request_counter), None, ids, None, outputs, True, num_cached_tokens=cached
        )

    @torch.inference_mode()
    def _decode(self, ids: list[int], sp: SamplingParams) -> list[CompletionOutput]:
        """The request's n samples, decoded in lockstep (one batched forward per step, no KV cache)."""
        generators = []
        for index in range(sp.n):  # the i-th sample is seeded with seed + i (v1/engine/parallel_sampling.py)
            g = torch.Generator()
            g.manual_seed(sp.seed + index) if sp.seed is not None else g.seed()
            generators.append(g)
        limit = min(sp.max_tokens or 10**9, self.llm.model_config.max_model_len - len(ids))
        eos = None if sp.ignore_eos else self.llm._tokenizer.eos_token_id
        tokens: list[list[int]] = [[] for _ in range(sp.n)]
        logprobs: list[list[dict[int, Logprob]]] = [[] for _ in range(sp.n)]
        finish: list[tuple[str, int | str | None] | None] = [None] * sp.n
        for step in range(limit):
            alive = [i for i in range(sp.n) if finish[i] is None]
            if not alive:
                break
            logits = self.llm._model(torch.tensor([ids + tokens[i] for i in alive])).logits[:, -1].float()
            for row, i in enumerate(alive):
                token, entry = self._pick(logits[row], sp, generators[i])
                tokens[i].append(token)
                logprobs[i].append(entry)
                if token == eos:  # check_stop: EOS first, then stop token ids, then the length
                    finish[i] = ("stop", None)
                elif token in sp.stop_token_ids:
                    finish[i] = ("stop", token)
                elif (hit := self._stop_string(tokens[i], sp)) is not None:  # overrides "length"
                    finish[i] = ("stop", hit)
                elif step + 1 == limit:
                    finish[i] = ("length", None)
        return [self._output(i, tokens[i], logprobs[i], *finish[i], sp) for i in range(sp.n)]

    def _output(self, index, tokens, logprobs, reason, stop_reason, sp: SamplingParams) -> CompletionOutput:
        text = (
            self.llm._tokenizer.decode(tokens, skip_special_tokens=sp.skip_special_tokens)
            if sp.detokenize
            else ""
        )
        with_logprobs = sp.logprobs is not None
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=tokens,
            cumulative_logprob=sum(next(iter(e.values())).logprob for e in logprobs)
            if with_logprobs
            else None,
            logprobs=logprobs if with_logprobs else None,
            finish_reason=reason,
            stop_reason=stop_reason,
        )

    def _pick(self, logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator) -> tuple[int, dict]:
        """One token from one row of logits (V,), and its {token: Logprob} entry in the engine's
        logprobs_mode."""
        greedy = sp.temperature < _SAMPLING_EPS
        processed = logits if greedy or sp.temperature == 1.0 else logits / sp.temperature
        if greedy:
            token = int(processed.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(processed, -1), 1, generator=generator))
        raw = self.llm.model_config.logprobs_mode == "raw_logprobs"
        logp = torch.log_softmax(logits if raw else processed, -1)
        entry = {token: Logprob(float(logp[token]), rank=int((logp > logp[token]).sum()) + 1)}
        for top in torch.topk(logp, max(sp.logprobs or 0, 0)).indices.tolist():
            entry.setdefault(top, Logprob(float(logp[top]), rank=None))
        return token, entry

    def _stop_string(self, tokens: list[int], sp: SamplingParams) -> str | None:
        """The stop string the newest token completed (earliest ending first), like the detokenizer's
        check."""
        if not (sp.detokenize and sp.stop):
            return None
        text = self.llm._tokenizer.decode(tokens, skip_special_tokens=sp.skip_special_tokens)
        ends = [(text.find(s) + len(s), s) for s in sp.stop if s in text]
        return min(ends)[1] if ends else None

    def _cached_tokens(self, ids: list[int]) -> int:
        """Prompt tokens served by the prefix cache: full blocks only, never the last prompt token."""
        if not self.llm.enable_prefix_caching:
            return 0
        best = 0
        for end in range(_BLOCK_SIZE, len(ids), _BLOCK_SIZE):
            if tuple(ids[:end]) in self._cached:
                best = end
        return best

    def _remember(self, seq: list[int]) -> None:
        if self.llm.enable_prefix_caching:
            self._cached.update(tuple(seq[:end]) for end in range(_BLOCK_SIZE, len(seq) + 1, _BLOCK_SIZE))


class Worker:
    """vllm/v1/worker/gpu_worker.py Worker, as far as collective_rpc reaches it."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.received: list[tuple[str, torch.Tensor]] = []

    def reload_weights(
        self, weights_iterator: Any = None, weights_path: str | None = None, is_checkpoint_format: bool = True
    ) -> None:
        if "weights" in self.llm.sleeping_tags:
            raise RuntimeError(
                "fake vLLM: reload_weights while the weights sleep would write unmapped memory"
            )
        if weights_iterator is None or not is_checkpoint_format:
            raise NotImplementedError("the fake engine reloads checkpoint-format (Hugging Face) tensors only")
        model = self.llm._model
        params = dict(model.named_parameters())
        tied = getattr(model.config, "tie_word_embeddings", False)
        self.llm.received_weights = []
        with torch.no_grad():
            for name, tensor in weights_iterator:
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
                self.llm.received_weights.append((name, tensor.dtype))
                if tied and name == "lm_head.weight":  # Qwen2ForCausalLM.load_weights skips it when tied
                    continue
                params[name].copy_(tensor)  # an unknown name is a KeyError, as in vLLM's load_weights


def load(model: str, tokenizer: str, dtype: str) -> tuple[Any, Any]:
    if model in MODELS:  # a copy: weight loads must not reach the caller's model
        lm, tok = copy.deepcopy(MODELS[model][0]), MODELS[model][1]
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm, tok = AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(tokenizer)
    if dtype != "auto":
        lm = lm.to(getattr(torch, dtype))
    return lm.eval(), tok
