"""Step texts decoded over the whole path, one level at a time (used by ``sampler.grow_trees``). Pure.

Decoding each step's tokens on their own breaks text that a tokenizer spreads over several tokens: a
byte-level BPE writes a character outside its vocabulary as one token per byte ("\\u2713" is three), and a
step cut by token count can end inside it, so each half decodes to U+FFFD and the env scores text the model
never wrote. Here a node's text is decoded from its whole response (every token after the prompt), and:

- its *committed* text is that decode with a trailing incomplete character (U+FFFD at the end) held back,
  unless the node is known to be a leaf (then everything is committed);
- its *step* text, what the env is stepped with, is its committed text minus its parent's committed text.

So the step texts of a path concatenate to ``decode(response ids)`` at a leaf that the backend ended (EOS,
depth D). A leaf that the env ends by itself (end marker, character or step limit) drops the held-back bytes
of at most one unfinished character: the env had already ended when they would have been committed.

A decoder whose text of a prefix is not a prefix of the longer text (neither byte-level BPE nor SentencePiece
is such a decoder; clean-up of spaces is switched off) gets the text past the parent's length as its step: the
env already holds the parent's text and can only be appended to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["REPLACEMENT", "decode_steps"]

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


def decode_steps(
    tokenizer: Any, responses: Sequence[Sequence[int]], committed: Sequence[str], final: Sequence[bool]
) -> list[tuple[str, str]]:
    """``(step text, committed text)`` per path.

    ``responses[i]``: the path's response ids, its newest step included (not the prompt); ``committed[i]``:
    the parent's committed text; ``final[i]``: the node is a leaf (commit everything). One batched decode;
    special tokens are kept (the EOS text must reach the env).
    """
    texts = tokenizer.batch_decode(
        [list(r) for r in responses], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    out = []
    for text, before, end in zip(texts, committed, final, strict=True):
        now = text if end else text.rstrip(REPLACEMENT)
        step = now[len(before) :]
        out.append((step, before + step))  # == (step, now) whenever ``before`` is a prefix of ``now``
    return out
