"""Prompt formatting for base and instruct models (config fields ``chat_template`` and ``system_prompt``).

Pure and Ray-free. An env's prompt is plain text (e.g. ``"7+5-3=?\\n"``); what the model is fed depends on
the model:

- base model (``chat_template: false``): the env prompt as is, with ``system_prompt`` (if any) and a newline
  in front;
- instruct model (``chat_template: true``): the tokenizer's chat template applied to
  ``[{"role": "system", ...}?, {"role": "user", "content": prompt}]`` with the generation prompt appended,
  so the model answers as the assistant. The template's special tokens are part of the returned text and
  must be tokenized with ``add_special_tokens=False`` (the sampler does), or a BOS would be doubled.

The response (what the policy generates and the env scores) is never templated: it is the assistant turn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PromptTokenizer", "format_prompt", "prompt_tokenizer"]


def format_prompt(
    tokenizer: Any, text: str, *, chat_template: bool = False, system_prompt: str | None = None
) -> str:
    """The text the model sees for the env prompt ``text`` (module docstring for the two cases).

    Raises ValueError naming the config field when ``chat_template`` is set but the tokenizer has no chat
    template, or when the template rejects the messages (some templates have no system role).
    """
    if not chat_template:
        return text if not system_prompt else f"{system_prompt}\n{text}"
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"config field 'chat_template' is true, but the tokenizer {name!r} has no chat template "
            "(a base model? set chat_template: false)"
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors, e.g. "System role not supported"
        field = "system_prompt" if system_prompt else "chat_template"
        raise ValueError(f"config field {field!r}: the tokenizer's chat template failed: {e}") from e
    if not isinstance(out, str):
        raise ValueError(
            f"config field 'chat_template': apply_chat_template returned {type(out).__name__}, expected text"
        )
    return out


class PromptTokenizer:
    """A tokenizer whose ``__call__`` formats a single prompt string with :func:`format_prompt` first.

    Everything else (``decode``, ``eos_token``, ``eos_token_id``, ...) is the wrapped tokenizer's. For callers
    that tokenize prompts as ``tokenizer(prompt, ...)``, e.g. ``sampler.sample_trees`` and
    ``evaluate.evaluate``: hand them this object as their tokenizer and the backend the plain one.
    """

    def __init__(
        self, tokenizer: Any, *, chat_template: bool = False, system_prompt: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = bool(chat_template)
        self.system_prompt = system_prompt

    def format(self, text: str) -> str:
        return format_prompt(
            self.tokenizer, text, chat_template=self.chat_template, system_prompt=self.system_prompt
        )

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str):
            text = self.format(text)
        elif isinstance(text, list | tuple) and all(isinstance(t, str) for t in text):
            text = [self.format(t) for t in text]
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only called for names not found on this object
        try:
            tokenizer = self.__dict__["tokenizer"]
        except KeyError:  # while copying or unpickling
            raise AttributeError(name) from None
        return getattr(tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)


def prompt_tokenizer(tokenizer: Any, *, chat_template: bool = False, system_prompt: str | None = None) -> Any:
    """``tokenizer`` itself when no formatting is configured, else a :class:`PromptTokenizer` around it.

    Checks a chat template up front (ValueError naming the field), not at the first prompt.
    """
    if not chat_template and not system_prompt:
        return tokenizer
    wrapped = PromptTokenizer(tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    wrapped.format("")  # fail now if the template is missing or rejects the messages
    return wrapped
