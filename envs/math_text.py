"""Text of math answers: the last closed ``\\boxed{...}``, bracket nesting, the gold string of math-verify.

Pure string functions (no math-verify): the arithmetic env's end marker and the reward's pre-screening.
"""

from __future__ import annotations

_BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Content of the last *closed* ``\\boxed{...}`` in ``text`` (balanced braces), else None."""
    pos = text.rfind(_BOXED)
    while pos >= 0:
        depth, start = 1, pos + len(_BOXED)
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
        pos = text.rfind(_BOXED, 0, pos)
    return None


def has_closed_boxed(text: str) -> bool:
    """True when ``text`` contains a complete ``\\boxed{...}`` (the end marker of math envs)."""
    return last_boxed(text) is not None


def nesting_depth(text: str) -> int:
    """Largest nesting depth of (), [] and {} in ``text`` (closers never go below zero)."""
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            if depth > best:
                best = depth
        elif ch in ")]}" and depth > 0:
            depth -= 1
    return best


def gold_latex(answer: str) -> str:
    """The string math-verify parses as gold: ``$answer$`` unless it already has ``$`` or \\boxed."""
    return answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
