"""Generation backends behind one small interface, chosen by name and imported lazily.

``make_backend("hf", model, tokenizer)`` builds the transformers reference backend; ``"vllm"`` is the GPU
backend (vllm.py, written against vllm 0.32.0; docs/vllm.md). Importing this package imports neither
transformers nor vllm: a backend module is imported only when its name is chosen, and choosing ``vllm`` where
the vllm package is missing is one ImportError naming the optional extra, before anything is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import FinishReason, GenerationBackend, GenerationStats, MissingExtraError, Sample, SamplingParams

__all__ = [
    "BACKENDS",
    "FinishReason",
    "GenerationBackend",
    "GenerationStats",
    "MissingExtraError",
    "Sample",
    "SamplingParams",
    "get_backend_class",
    "make_backend",
]

# name -> (module relative to this package, class name)
BACKENDS: dict[str, tuple[str, str]] = {"hf": (".hf", "HFBackend"), "vllm": (".vllm", "VLLMBackend")}


def get_backend_class(name: str) -> type[GenerationBackend]:
    """The backend class registered under ``name`` (imports its module now, not before)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; valid names: {sorted(BACKENDS)}")
    module_name, class_name = BACKENDS[name]
    module = importlib.import_module(module_name, __name__)
    if name == "vllm":
        module.require_vllm()  # the module itself imports vllm only when it builds an engine
    return getattr(module, class_name)


def make_backend(name: str, model: Any, tokenizer: Any, **kwargs: Any) -> GenerationBackend:
    """The backend ``name`` around ``model`` (a causal LM, or what the backend loads) and ``tokenizer``."""
    return get_backend_class(name)(model, tokenizer, **kwargs)
