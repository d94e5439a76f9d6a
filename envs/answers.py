"""The final answer of a response, in the forms real models write it. Pure: the standard library only.

Formats, named in an env's ``answer_format`` (env_config of treerpo/MathProblems-v0 and
treerpo/ReasoningGym-v0; one name or a list; default ``boxed``, the rule these envs always had):

- ``boxed``: the content of a closed ``\\boxed{...}`` (balanced braces);
- ``answer_tag``: the content of ``<answer>...</answer>`` (tag names in any case);
- ``answer_is``: the rest of the line after "answer is" or "answer:" ("The final answer is 12.", "Answer: 12",
  "**Final Answer:** $12$"), without markdown bold, ``$...$`` / ``\\(...\\)``, and a trailing period;
- ``last_number``: the last number of the response ("7 + 5 = 12" -> "12"; integers, decimals, a/b, thousands
  commas dropped). What small instruct models write unprompted (measured: docs/real_models.md), but lenient: a
  response listing numbers is right when its last one is; it has no end marker (the response ends at EOS).

Every answer is stripped of surrounding spaces, and one that is a single ``\\boxed{X}`` becomes X. When a
response holds several, the one that ENDS LAST is its answer (a model that restates its result means the
restatement).

The end of a response (``is_final``, the env's end marker) follows the same formats, on one step's text: a
closed box, a closed tag, or an "answer is" line that a newline ends (without one, "The answer is 1" may go on
"2"); a number never ends a response. A form split across two steps does not end the episode, but the response
is still scored on all its text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "ANSWER_FORMATS",
    "DEFAULT_ANSWER_FORMAT",
    "check_answer_format",
    "extract_answer",
    "find_answers",
    "has_final_answer",
]

ANSWER_FORMATS = ("boxed", "answer_tag", "answer_is", "last_number")
DEFAULT_ANSWER_FORMAT = ("boxed",)

_BOX_OPEN = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
# "answer is" (not "isn't") or "answer:" (bold markers allowed before the colon); the value is the rest of the
# line.
_ANSWER_IS = re.compile(r"\banswer(?:\s+is(?![\w'])[ \t]*:?|[ \t]*\**[ \t]*:)", re.IGNORECASE)
_LINE = re.compile(r"[^\n]*\n?")
_SENTENCE_END = re.compile(r"\.\s")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def check_answer_format(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The formats as a tuple (one name or a list; None is the default); a ValueError naming the field if
    bad."""
    if value is None:
        return DEFAULT_ANSWER_FORMAT
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list | tuple) else None
    if not names:
        raise ValueError(
            f"env_config field 'answer_format' = {value!r}: give a format or a list of formats of "
            f"{list(ANSWER_FORMATS)}"
        )
    for name in names:
        if name not in ANSWER_FORMATS:
            raise ValueError(
                f"env_config field 'answer_format' = {value!r}: unknown format {name!r}; valid: "
                f"{list(ANSWER_FORMATS)}"
            )
    return tuple(dict.fromkeys(names))


def find_answers(text: str, formats: Iterable[str] = DEFAULT_ANSWER_FORMAT) -> list[tuple[int, str, bool]]:
    """Every answer in ``text``, in the order they end: ``(end offset, answer, complete)``.

    ``complete``: the form has visibly ended (a box, a tag, an "answer is" line with its newline; never a
    number).
    """
    found: list[tuple[int, str, bool]] = []
    formats = tuple(formats)
    if "boxed" in formats:
        found += [(end, content, True) for _, end, content in _closed_boxes(text)]
    if "answer_tag" in formats:
        found += [(m.end(), m.group(1), True) for m in _TAG.finditer(text)]
    if "answer_is" in formats:
        found += _answer_lines(text)
    if "last_number" in formats:
        found += [(m.end(), m.group().replace(",", ""), False) for m in _NUMBER.finditer(text)][-1:]
    found = [(end, _unbox(answer.strip()), complete) for end, answer, complete in found]
    return sorted((a for a in found if a[1]), key=lambda a: a[0])


def extract_answer(text: str, formats: Iterable[str] = DEFAULT_ANSWER_FORMAT) -> str | None:
    """The final answer of a response (the one that ends last), or None when it has none."""
    found = find_answers(text, formats)
    return found[-1][1] if found else None


def has_final_answer(step_text: str, formats: Iterable[str] = DEFAULT_ANSWER_FORMAT) -> bool:
    """True when ``step_text`` holds a complete answer: the end marker of a response (module docstring)."""
    return any(complete for _, _, complete in find_answers(step_text, formats))


def _closed_boxes(text: str) -> list[tuple[int, int, str]]:
    """``(offset of its "{", end offset, content)`` of every closed ``\\boxed{...}``: one pass over the
    braces."""
    opens = {m.end() - 1 for m in _BOX_OPEN.finditer(text)}  # offsets of the boxes' "{"
    if not opens:
        return []
    stack: list[int] = []
    out = []
    for m in _BRACE.finditer(text):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            j = stack.pop()
            if j in opens:
                out.append((j, i + 1, text[j + 1 : i]))
    return out


def _answer_lines(text: str) -> list[tuple[int, str, bool]]:
    """The "answer is" answers: per line, the value after its LAST phrase ("Final Answer: The final answer is
    7.")."""
    out = []
    for line in _LINE.finditer(text):
        heads = list(_ANSWER_IS.finditer(line.group()))
        if heads:
            value = _clean_line(line.group()[heads[-1].end() :])
            if value:
                out.append((line.end(), value, line.group().endswith("\n")))
    return out


def _clean_line(value: str) -> str:
    """An "answer is" value up to its first sentence end, without markdown bold, math delimiters and a final
    period ("$12$. I hope it is correct." -> "12")."""
    value = _SENTENCE_END.split(value.strip(), maxsplit=1)[0].strip().strip("*").strip()
    if value.endswith(".") and not value.endswith(".."):
        value = value[:-1].rstrip()
    value = value.strip("*").strip()
    for left, right in _MATH_DELIMITERS:
        if len(value) > len(left) + len(right) and value.startswith(left) and value.endswith(right):
            return value[len(left) : -len(right)].strip()
    return value


def _unbox(answer: str) -> str:
    """``\\boxed{X}`` as a whole answer -> X (e.g. "The answer is $\\boxed{12}$")."""
    m = _BOX_OPEN.match(answer)
    if m is not None:
        for j, end, content in _closed_boxes(answer):
            if j == m.end() - 1 and end == len(answer):
                return content.strip()
    return answer
