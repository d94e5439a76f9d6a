"""The learner's memory savings chosen by size: the LM head's chunks (forward.logits_chunk_size) and the heap
trims (memory.trim_heap)."""

from __future__ import annotations

import os

import pytest
import torch

from rllib_treerpo.learner.forward import LOGITS_BLOCK_BYTES, head_target_stats, logits_chunk_size
from rllib_treerpo.learner.memory import free_heap_bytes, trim_heap


def test_logits_are_chunked_only_above_the_memory_bound():
    # SmolLM2's vocabulary: a forward's 4096 loss positions hold 805 MB of fp32 logits -> chunks of 256
    assert logits_chunk_size(4096, 49152, 256) == 256
    # the tiny model's 99 tokens: 1.6 MB -> one block, no recomputation
    assert logits_chunk_size(4096, 99, 256) == 4096
    # the bound itself: 341 SmolLM2 positions fit (64.0 MB), 342 do not
    assert LOGITS_BLOCK_BYTES == 64 * 2**20
    assert logits_chunk_size(341, 49152, 256) == 341
    assert logits_chunk_size(342, 49152, 256) == 256
    assert logits_chunk_size(10**6, 49152, None) == 10**6  # null: never chunked
    assert logits_chunk_size(0, 99, 256) == 1


def _head_calls(vocab: int, bound_bytes: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Rows of each LM-head call (forward and backward) and the hidden state's gradient, chunk 8."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(4, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 4, dtype=torch.float64, generator=g))
    hidden = torch.randn(2, 10, 4, dtype=torch.float64, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (2, 10), generator=g)
    rows: list[int] = []
    head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    logprobs, _ = head_target_stats(head, hidden, targets, 1.0, chunk=8, bound_bytes=bound_bytes)
    logprobs.sum().backward()
    return rows, logprobs.detach(), hidden.grad


def test_the_size_rule_picks_one_block_or_checkpointed_chunks_with_the_same_results():
    # 20 positions x 50 tokens x 4 bytes = 4000 bytes of logits
    whole = _head_calls(50, bound_bytes=4000)
    chunked = _head_calls(50, bound_bytes=3999)
    assert whole[0] == [20]  # one block, not recomputed
    assert chunked[0] == [8, 8, 4, 4, 8, 8]  # chunks of 8, each computed again in the backward (last first)
    torch.testing.assert_close(whole[1], chunked[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(whole[2], chunked[2], atol=1e-12, rtol=0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(free_heap_bytes() is None, reason="glibc's mallinfo2/malloc_trim only")
def test_the_heap_is_trimmed_only_when_it_holds_much_free_memory():
    blocks = [bytearray(64 * 1024) for _ in range(1000)]  # 64 MB under the mmap threshold: in the heap
    pins = blocks[::16]  # kept: the freed blocks between them cannot merge into the heap's top
    del blocks
    free = free_heap_bytes()
    assert free > 48 * 2**20
    assert not trim_heap(min_bytes=free + 1)  # too little free: nothing done
    before = _rss()
    assert trim_heap(min_bytes=free // 2)
    assert before - _rss() > 32 * 2**20  # the freed pages left the resident set
    assert len(pins) == 63
