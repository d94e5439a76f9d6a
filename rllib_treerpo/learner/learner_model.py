"""The learner's copy of the policy: loaded in its master dtype, optionally gradient-checkpointed, and a
frozen reference copy for the KL term. Ray-free.

Gradient checkpointing (:func:`enable_gradient_checkpointing`): each decoder layer's activations are
recomputed in the backward; the recomputation runs with the attention implementation that the forward used
(the tree packs' segment attention is switched on only around the forward, tree_attention.using_segments).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from typing import Any

import torch

from rllib_treerpo.learner.precision import master_dtype


def load_trainable(
    model_name_or_path: str | None, dtype: str, *, mixed_precision: bool, gradient_checkpointing: bool
) -> torch.nn.Module:
    """The learner's copy of a causal LM: parameters in precision.master_dtype, optionally checkpointed."""
    from rllib_treerpo.models.model_io import load_causal_lm

    model = load_causal_lm(model_name_or_path, master_dtype(dtype, mixed_precision))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def reference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the policy for the KL term, in the policy's own dtype: under the same
    precision.compute_context it computes exactly what the policy computed before its first update."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


@contextlib.contextmanager
def _attention_implementation(config: Any, name: str) -> Iterator[None]:
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def _recompute_like_forward(config: Any) -> tuple[contextlib.AbstractContextManager, Any]:
    """checkpoint's context_fn: called at the forward; the recomputation runs with the forward's attention."""
    return contextlib.nullcontext(), _attention_implementation(config, config._attn_implementation)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations (train mode only).

    Non-reentrant torch checkpointing (it keeps autocast and the RNG state); the context is bound to the
    model's config through a partial, so a deepcopy of the model (a reference model, a replica) recomputes
    with its own.
    """
    kwargs = {"use_reentrant": False, "context_fn": functools.partial(_recompute_like_forward, model.config)}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
