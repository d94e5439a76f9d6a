"""Tiny offline models for the embedded default task and for tests.

Nothing here downloads: the tokenizers are built in memory (a character-level vocabulary for the embedded
model, a byte-level BPE with merges and chat special tokens for tests of real-model behaviour) and the model
is a randomly initialised Qwen2 built from a transformers config. All save with ``save_pretrained`` so that
every later load goes through the real ``from_pretrained(path)`` code that a user's hub model also takes.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD = "<pad>"
UNK = "<unk>"
EOS = "</s>"
# Every printable ASCII character plus newline and space: covers the arithmetic task and LaTeX answers.
DEFAULT_CHARSET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")


def build_char_tokenizer(charset: str = DEFAULT_CHARSET) -> PreTrainedTokenizerFast:
    """One token per character of ``charset`` plus <pad>, <unk> and </s> (ids 0, 1, 2).

    A byte-level BPE with no merges: every character is its own token and ``decode(encode(text)) == text``.
    Byte-level (GPT-2 style, as Qwen2 uses) matters: ``AutoTokenizer.from_pretrained`` on a folder whose
    config.json says qwen2 rebuilds the tokenizer as Qwen2Tokenizer with a byte-level pre-tokenizer, and a
    plain character vocabulary would then silently lose spaces and newlines.
    """
    byte_char = _bytes_to_unicode()
    chars = list(dict.fromkeys(charset))  # de-duplicate, keep order
    specials = [PAD, UNK, EOS]
    vocab = {
        tok: i for i, tok in enumerate(specials + ["".join(byte_char[b] for b in c.encode()) for c in chars])
    }
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, eos_token=EOS)


# ChatML, the chat format of SmolLM2 and Qwen2 instruct models (without their default system turn).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
_BPE_CORPUS = (
    "Let me think step by step. First, add the numbers: 7 + 5 = 12.\n",
    "Then subtract: 12 - 3 = 9. The answer is 9.\n",
    "So the final answer is \\boxed{9}.\n",
    "Answer: 42\n<answer>42</answer>\n",
    "What is 15 + 27? Give the final answer as \\boxed{ANSWER}.\n",
)


def build_bpe_tokenizer(
    corpus: Iterable[str] | None = None,
    *,
    vocab_size: int = 320,
    eos_token: str = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    specials: Sequence[str] = BPE_SPECIALS,
    chat_template: str | None = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A real byte-level BPE with merges, trained in memory in milliseconds (deterministic for a corpus).

    Like the tokenizers of SmolLM2 / Qwen2 instruct models: every byte is a token (so a character outside the
    corpus, e.g. "\u2713", is several tokens and a step can end inside it), frequent pieces are merged
    (" answer", "12"), the ``specials`` are single tokens (ids 0, 1, ...) and ``chat_template`` is ChatML. The
    pre-tokenizer is Qwen2's split, so a Qwen2 model folder reloads it (as Qwen2Tokenizer) with the same ids.
    ``pad_token=eos_token`` gives the "pad is EOS" setup of many instruct models; ``None`` gives no pad token.
    """
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus if corpus is not None else _BPE_CORPUS * 8), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token)
    tokenizer.chat_template = chat_template
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what a byte-level BPE vocabulary is written in)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 96,
    num_layers: int = 3,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_positions: int = 512,
    seed: int = 0,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM (about 0.45M parameters at the defaults)."""
    import torch

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


# The smallest model the tests and the fault soak train (1 layer, hidden 32): plumbing, not accuracy.
TEST_ARCHITECTURE = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_positions": 256,
}


def save_tiny_model(folder: str | Path, **architecture: Any) -> str:
    """A random tiny model (``build_tiny_model``'s arguments) with the character tokenizer, saved as a Hugging
    Face folder; returns the folder. Tests and benchmarks use it as a stand-in for a real model."""
    tokenizer = build_char_tokenizer()
    build_tiny_model(len(tokenizer), **architecture).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
