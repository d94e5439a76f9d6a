"""Precision and memory of the learner's model (issue 14): what a 0.5B-7B model needs. Ray-free.

- Mixed precision, the way trainers do it (torch AMP): with ``dtype: bfloat16`` and ``mixed_precision: true`` the
  learner's model keeps float32 parameters (the master copy AdamW steps, so its state is float32 too: a small-lr
  update is not rounded away) and its forward runs under ``torch.autocast(bfloat16)`` (matmuls in bf16, reductions
  and the residual stream in fp32). :func:`compute_context` decides from the parameters' dtype, so the RLlib
  module, its reference model and the Ray-free replica (iteration.policy_update) all compute the same way.
  ``mixed_precision: false`` trains the bf16 weights themselves (bf16 AdamW state; most small updates round to 0).
- The sampler's copy is in ``dtype`` (bf16): :func:`cast_floating` turns the master state into it for the weight
  sync; the exported final_model is written in ``dtype`` too.
- Gradient checkpointing (:func:`enable_gradient_checkpointing`): each decoder layer's activations are recomputed
  in the backward; the recomputation runs with the attention implementation that the forward used (the tree
  packs' segment attention is switched on only around the forward, tree_attention.using_segments).
- States that pickle without a copy (:func:`state_tensors`): torch pickles a tensor by serialising its storage
  into a new bytes object, which the pickler keeps until the whole dump is done, so a checkpoint of weights plus
  AdamW state (12-16 bytes per parameter) doubled the memory it needed. The tensors of a state are handed out as
  :class:`StateTensor` views that pickle as a numpy view of their bytes (protocol 5 writes it as is; Ray's
  serializer ships it out of band) and come back as plain tensors of their dtype (bf16 included: no numpy dtype).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from rllib_treerpo.model_io import DTYPES


def master_dtype(dtype: str, mixed_precision: bool) -> str:
    """The dtype the learner's parameters (and so its optimizer state) are kept in."""
    if dtype not in DTYPES:
        raise ValueError(f"config field 'dtype' = {dtype!r}: must be one of {list(DTYPES)}")
    return "float32" if mixed_precision else dtype


def compute_context(model: torch.nn.Module, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` when the model's floating parameters are wider (mixed precision), else a
    no-op: float32 runs and models already in ``dtype`` compute as they are."""
    target = DTYPES[dtype]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.dtype == target or target == torch.float32:
        return contextlib.nullcontext()
    # No cast cache: it would hold a low-precision copy of every weight until the forward ends (0.27 GB for 135M
    # parameters), which gradient checkpointing cannot free; without it each op casts its weight when it runs
    # (the same numbers; the ops that keep their input for the backward keep the cast anyway).
    return torch.autocast(device_type=param.device.type, dtype=target, cache_enabled=False)


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

    Non-reentrant torch checkpointing (it keeps autocast and the RNG state); the context is bound to the model's
    config through a partial, so a deepcopy of the model (a reference model, a replica) recomputes with its own.
    """
    kwargs = {"use_reentrant": False, "context_fn": functools.partial(_recompute_like_forward, model.config)}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def adamw(params, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """The learners' optimizer (RLlib's learner, the Ray-free replica): AdamW, fused where torch has the kernel
    (CPU and CUDA): one pass per parameter with no temporaries, where the default per-tensor loop allocates
    parameter-sized intermediates (0.2 GB for a 49k x 576 embedding) at the step that is the update's peak."""
    params = list(params)
    devices = {p.device.type for p in params if isinstance(p, torch.Tensor)}
    return torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, fused=bool(devices) and devices <= {"cpu", "cuda"}
    )


def trim_heap() -> None:
    """Hand the memory that Python and torch freed back to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    Tensors under glibc's mmap threshold (32 MB: most of a model's per-layer weights, gradients and optimizer
    moments) live in the heap, whose freed pages otherwise stay resident and are not always reused: measured on
    SmolLM2-135M, a driver's resident memory kept 0.6 GB of freed gradients, logits and weight-sync copies after
    each update, and the next update's peak grew on top of it. Called after phases that free much (in a learner
    update before its backward and before its step, after a weight sync, after an evaluation)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def load_trainable(
    model_name_or_path: str | None,
    dtype: str = "float32",
    *,
    mixed_precision: bool = True,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """The learner's copy of a causal LM: parameters in :func:`master_dtype`, optionally checkpointed."""
    from rllib_treerpo.model_io import load_causal_lm

    model = load_causal_lm(model_name_or_path, master_dtype(dtype, mixed_precision))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def reference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the policy for the KL term, in the policy's own dtype: under the same
    :func:`compute_context` it computes exactly what the policy computed before its first update."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def cast_floating(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors of ``state`` in ``dtype`` (e.g. the bf16 sampler's copy of float32 masters)."""
    target = DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


# --- states that pickle without a copy -------------------------------------------------------------------------
class StateTensor(torch.Tensor):
    """A view of a state tensor that pickles as a numpy view of its bytes (no copy) and unpickles as a plain
    tensor of its dtype. In process it is a tensor like any other."""

    def __reduce_ex__(self, protocol):
        plain = self.as_subclass(torch.Tensor).detach().cpu().contiguous()
        raw = plain.reshape(-1).view(torch.uint8).numpy()  # 0-dim tensors included; bf16 has no numpy dtype
        return _rebuild, (raw, str(plain.dtype).removeprefix("torch."), tuple(plain.shape))


def _rebuild(raw, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    with warnings.catch_warnings():  # Ray's object store hands out read-only buffers; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(raw)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def state_tensors(value: Any) -> Any:
    """``value`` (nested dicts, lists, tuples) with every tensor as a detached :class:`StateTensor` view."""
    if isinstance(value, torch.Tensor):
        return value.detach().as_subclass(StateTensor)
    if isinstance(value, Mapping):
        return {k: state_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(state_tensors(v) for v in value)
    return value


def plain_tensor(value: Any) -> torch.Tensor:
    """A plain tensor from a tensor, a :class:`StateTensor` or a numpy array (an older checkpoint)."""
    return torch.as_tensor(value).as_subclass(torch.Tensor)
