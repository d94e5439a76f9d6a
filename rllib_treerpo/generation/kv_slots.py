"""The K/V the hf backend keeps: preallocated buffers for its decode loop, the entries of finished samples and
their lookup by token prefix (see hf.py's module docstring).

A ``SlotLayer`` is a transformers DynamicLayer over buffers sized for one generate call, so a decode step
writes one slot per row instead of concatenating the whole cache. KV tensors are
``(batch, kv_heads, slots, head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

Key = tuple[int, ...]  # a kept sequence's token ids (context + new tokens)
KVGroup = list[
    tuple[torch.Tensor, torch.Tensor]
]  # rows set aside together: per layer (keys, values) (n, H, S, D)


@dataclass
class CacheEntry:
    """Where one kept sequence's K/V lives: row ``row`` of ``group``, at ``slots`` (one per cached token)."""

    group: KVGroup
    row: int
    slots: np.ndarray  # (len(key) - 1,) int64, increasing


class SlotLayer(DynamicLayer):
    """A DynamicLayer over preallocated (B, H, capacity, D) buffers; ``keys``/``values`` view the first
    ``length``.

    ``update`` writes the new slots in place. The capacity is planned per generate call (cached + tail + new
    tokens), so it never grows.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (key_states.shape[0], key_states.shape[1], self.capacity, key_states.shape[3])
        self.set_buffers(key_states.new_zeros(shape), value_states.new_zeros(shape), 0)

    def set_buffers(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
        self.dtype = kbuf.dtype
        self.device = kbuf.device
        self.is_initialized = True
        self._kbuf = kbuf
        self._vbuf = vbuf
        self.length = length
        self.keys = kbuf[:, :, :length]
        self.values = vbuf[:, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]  # the capacity was planned for the call: no overflow check
        self._kbuf[:, :, self.length : end] = key_states
        self._vbuf[:, :, self.length : end] = value_states
        self.set_buffers(self._kbuf, self._vbuf, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # (kv_length, kv_offset)
        return self.length + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep/repeat rows: copies only the ``length`` filled slots (unfilled ones are written before
        read)."""
        if self.is_initialized:
            shape = (len(indices), *self._kbuf.shape[1:])
            kbuf = self._kbuf.new_empty(shape)
            vbuf = self._vbuf.new_empty(shape)
            torch.index_select(self.keys, 0, indices, out=kbuf[:, :, : self.length])
            torch.index_select(self.values, 0, indices, out=vbuf[:, :, : self.length])
            self.set_buffers(kbuf, vbuf, self.length)


class SlotCache(DynamicCache):
    """A DynamicCache whose layers are _SlotLayers (the model only calls update / get_seq_length / mask
    sizes)."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        Cache.__init__(self, layers=layers)


def merge_entries(entries: list[CacheEntry | None], c_max: int, layers: list[SlotLayer], device) -> None:
    """Fill each layer's buffers (U, H, capacity, D) with the kept entries, right-aligned at slot c_max.

    Rows without an entry and padding slots hold zeros: they are masked. One gather per layer and source
    group copies exactly the cached slots (holes and stale slots of the source rows are dropped here).
    """
    plans: dict[int, tuple[KVGroup, list]] = {}  # source group -> its (target row, entry) pairs
    for u, e in enumerate(entries):
        if e is not None:
            plans.setdefault(id(e.group), (e.group, []))[1].append((u, e))
    gathers = []  # (group, target rows (n,), source rows (n, 1), source slots (n, c_max) or a slice)
    for group, members in plans.values():
        slots = np.zeros((len(members), c_max), np.int64)
        for r, (_, e) in enumerate(members):
            slots[r, c_max - len(e.slots) :] = e.slots
            slots[r, : c_max - len(e.slots)] = e.slots[0]  # any real slot: finite, and masked
        first = slots[0, 0]
        if (slots == np.arange(first, first + c_max)).all():  # the usual tree case: one contiguous run
            idx: torch.Tensor | slice = slice(int(first), int(first) + c_max)
        else:
            idx = torch.from_numpy(slots).to(device)
        gathers.append(
            (
                group,
                torch.tensor([u for u, _ in members], device=device),
                torch.tensor([e.row for _, e in members], device=device)[:, None],
                idx,
            )
        )
    # One group filling every row with one run of slots (a tree's next level): a single row gather per tensor.
    whole = len(gathers) == 1 and isinstance(gathers[0][3], slice) and len(gathers[0][1]) == len(entries)
    for index, layer in enumerate(layers):
        k0, v0 = gathers[0][0][index]
        shape = (len(entries), k0.shape[1], layer.capacity, k0.shape[3])
        bufs = (
            (k0.new_empty(shape), v0.new_empty(shape))
            if whole
            else (k0.new_zeros(shape), v0.new_zeros(shape))
        )
        for group, targets, src, idx in gathers:
            for buf, source in zip(bufs, group[index], strict=True):
                if whole:  # slots past c_max are written before they are read
                    torch.index_select(source[:, :, idx], 0, src[:, 0], out=buf[:, :, :c_max])
                elif isinstance(idx, slice):  # rows, then a slice of slots: no per-slot gather
                    buf[targets, :, :c_max] = source[src[:, 0], :, idx]
                else:  # (rows, H, S, D) -> (rows, S, H, D) view, gather (n, c_max) slots, back
                    buf[targets, :, :c_max] = source.transpose(1, 2)[src, idx].transpose(1, 2)
        layer.set_buffers(*bufs, c_max)


def longest_prefix(key: Key, store: dict[Key, CacheEntry], lengths: list[int]) -> CacheEntry | None:
    """The entry of ``store`` whose key is the longest prefix of ``key`` (usually ``key`` itself).

    ``lengths``: the kept key lengths, longest first; only those shorter than ``key`` are tried, so a prompt
    costs one dict lookup.
    """
    if not store:
        return None
    entry = store.get(key)
    if entry is not None:
        return entry
    for n in lengths:  # descending
        if n < len(key):
            entry = store.get(key[:n])
            if entry is not None:
                return entry
    return None


def set_aside(
    cache: SlotCache, mask: torch.Tensor, batch_rows: torch.Tensor | None, sample_ids: list[int], groups: list
) -> None:
    """Keep the K/V of ``batch_rows`` (all rows when None: no copy) for ``sample_ids`` (same order)."""
    pick = (lambda t: t) if batch_rows is None else (lambda t: t[batch_rows])
    layers = [(pick(layer.keys), pick(layer.values)) for layer in cache.layers]
    mask_rows = pick(mask)
    valid = mask_rows.cpu().numpy()
    for r, s in enumerate(sample_ids):
        groups[s] = CacheEntry(layers, r, np.flatnonzero(valid[r]))
