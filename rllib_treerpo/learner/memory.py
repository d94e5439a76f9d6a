"""Resident memory between the phases of an iteration: glibc's heap handed back to the OS, when that is much.

Tensors under glibc's mmap threshold (32 MB: most of a model's per-layer weights, gradients and optimizer
moments) live in the heap, whose freed pages otherwise stay resident and are not always reused: a driver's
resident memory kept the freed gradients, logits and weight-sync copies of each update, and the next update's
peak grew on top of it (docs/real_models.md). :func:`trim_heap` is called where a phase has just freed much:

- the learner update (rllib/learner.py): after each forward (before its backward) and before the optimizer
  step;
- the weight sync (rllib/weight_sync.py): after the local sampler's weights are dropped, and after a sync;
- the job (jobs/): after an evaluation, and once the learner is freed before the final evaluation.

A trim is not free: the pages it returns fault in again when the next phase allocates (about 40 ms for
180 MB on the CPU measured). So it runs only when the heap holds at least :data:`TRIM_MIN_BYTES` free
(glibc's ``mallinfo2``, a few microseconds). Measured at the learner's trim points: the tiny model's heap
(the GRPO recipe, configs/tiny_arith_grpo.yaml) holds up to 240 MB free there (median 180), and trimming it
cost 15% of its learner CPU time for 4% of its peak resident memory; SmolLM2-135M's (configs/smollm2_cpu.yaml)
holds 460-2400 MB, and without the trims its update's peak grew by 0.4 GB per iteration (docs/real_models.md).
"""

from __future__ import annotations

import ctypes
from typing import Any

# Free heap bytes below which a trim is skipped: between the tiny model's most (240 MB) and SmolLM2's least
# (460 MB) at the learner's trim points.
TRIM_MIN_BYTES = 320 * 2**20

_libc: Any = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc() -> Any:
    """libc with ``malloc_trim`` and ``mallinfo2`` typed, or False where there is none (macOS, musl, old
    glibc)."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = _MallInfo2
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc


def free_heap_bytes() -> int | None:
    """Bytes glibc's heap holds free (all arenas: ``mallinfo2().fordblks``); None without glibc."""
    libc = _glibc()
    return int(libc.mallinfo2().fordblks) if libc else None


def trim_heap(min_bytes: int = TRIM_MIN_BYTES) -> bool:
    """Hand the heap memory that Python and torch freed back to the OS (glibc's ``malloc_trim``) when at least
    ``min_bytes`` of it are free; returns whether it trimmed (no-op without glibc)."""
    free = free_heap_bytes()
    if free is None or free < min_bytes:
        return False
    _glibc().malloc_trim(0)
    return True
