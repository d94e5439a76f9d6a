"""Generation backends behind one small interface, chosen by name and imported lazily.

``make_backend("hf", model, tokenizer)`` builds the transformers reference backend; ``"vllm"`` is reserved
for the GPU backend (not implemented yet). Importing this package imports neither transformers nor vllm:
a backend module is imported only when its name is chosen.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import FinishReason, GenerationBackend, GenerationStats, Sample, SamplingParams

__all__ = [
    "BACKENDS",
    "FinishReason",
    "GenerationBackend",
    "GenerationStats",
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
    try:
        module = importlib.import_module(module_name, __name__)
    except ModuleNotFoundError as err:
        # Only the backend's own module missing means "not written yet"; a missing dependency is re-raised.
        if err.name == __name__ + module_name:
            raise NotImplementedError(
                f"the {name} backend is not implemented yet; use backend='hf'"
            ) from None
        raise
    return getattr(module, class_name)


def make_backend(name: str, model: Any, tokenizer: Any, **kwargs: Any) -> GenerationBackend:
    """Build the backend ``name`` around ``model`` (a causal LM, or what the backend loads) and ``tokenizer``."""
    return get_backend_class(name)(model, tokenizer, **kwargs)
