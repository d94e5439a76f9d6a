"""The learner's numeric precision: master weights, the compute dtype, the sampler's dtype. Ray-free.

Mixed precision, the way trainers do it (torch AMP): with ``dtype: bfloat16`` and ``mixed_precision: true``
the learner's model keeps float32 parameters (the master copy AdamW steps, so its state is float32 too: a
small-lr update is not rounded away) and its forward runs under ``torch.autocast(bfloat16)`` (matmuls in bf16,
reductions and the residual stream in fp32). :func:`compute_context` decides from the parameters' dtype, so
the RLlib module, its reference model and the Ray-free update (update.policy_update) all compute the same way.
``mixed_precision: false`` trains the bf16 weights themselves (bf16 AdamW state; most small updates round to
0). The sampler's copy is in ``dtype``: :func:`cast_floating` turns the master state into it for the weight
sync; the exported final_model is written in ``dtype`` too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from rllib_treerpo.models.model_io import DTYPES


def master_dtype(dtype: str, mixed_precision: bool) -> str:
    """The dtype the learner's parameters (and so its optimizer state) are kept in."""
    if dtype not in DTYPES:
        raise ValueError(f"config field 'dtype' = {dtype!r}: must be one of {list(DTYPES)}")
    return "float32" if mixed_precision else dtype


def compute_context(model: torch.nn.Module, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` when the model's floating parameters are wider (mixed precision), else
    a no-op: float32 runs and models already in ``dtype`` compute as they are."""
    target = DTYPES[dtype]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.dtype == target or target == torch.float32:
        return contextlib.nullcontext()
    # No cast cache: it would hold a low-precision copy of every weight until the forward ends, which gradient
    # checkpointing cannot free; without it each op casts its weight when it runs (the same numbers; the ops
    # that keep their input for the backward keep the cast anyway).
    return torch.autocast(device_type=param.device.type, dtype=target, cache_enabled=False)


def cast_floating(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors of ``state`` in ``dtype`` (e.g. the bf16 sampler's copy of float32 masters)."""
    target = DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
