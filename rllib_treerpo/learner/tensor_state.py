"""States (weights, AdamW state) that pickle without a copy. Ray-free.

torch pickles a tensor by serialising its storage into a new bytes object, which the pickler keeps until the
whole dump is done, so a checkpoint of weights plus AdamW state (12-16 bytes per parameter) would need twice
its size. The tensors of a state are handed out as :class:`StateTensor` views that pickle as a numpy view of
their bytes (protocol 5 writes it as is; Ray's serializer ships it out of band) and come back as plain tensors
of their dtype (bf16 included: it has no numpy dtype).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch


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
