"""Resident memory between the phases of an iteration: glibc's heap handed back to the OS.

Tensors under glibc's mmap threshold (32 MB: most of a model's per-layer weights, gradients and optimizer
moments) live in the heap, whose freed pages otherwise stay resident and are not always reused: a driver's
resident memory kept the freed gradients, logits and weight-sync copies of each update, and the next update's
peak grew on top of it (docs/real_models.md). :func:`trim_heap` is called where a phase has just freed much:

- the learner update (rllib/learner.py): after each forward (before its backward) and before the optimizer
  step;
- the weight sync (rllib/weight_sync.py): after the local sampler's weights are dropped, and after a sync;
- the job (jobs/): after an evaluation, and once the learner is freed before the final evaluation.
"""

from __future__ import annotations

import ctypes
from typing import Any

_malloc_trim: Any = None


def trim_heap() -> None:
    """Hand the memory that Python and torch freed back to the OS (glibc's ``malloc_trim``; else no-op)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
