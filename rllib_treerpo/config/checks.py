"""Value checks of the settings: each returns why a value is bad, or None. Pure.

A field's check sees its own value (settings.py names one per field); :func:`check_fields` runs them over a
mapping and raises the one-line error that names the first bad field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Check = Callable[[Any], "str | None"]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(v: Any) -> str | None:
    return None if _integer(v) and v > 0 else "must be a positive integer"


def non_negative_int(v: Any) -> str | None:
    return None if _integer(v) and v >= 0 else "must be an integer >= 0"


def non_negative(v: Any) -> str | None:
    return None if _number(v) and v >= 0 else "must be a number >= 0"


def positive(v: Any) -> str | None:
    return None if _number(v) and v > 0 else "must be a number > 0"


def unit_interval(v: Any) -> str | None:
    return None if isinstance(v, int | float) and 0 < v <= 1 else "must be in (0, 1]"


def one_of(*choices: Any) -> Check:
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def optional(check: Check) -> Check:
    """``check``, or null."""
    return lambda v: None if v is None else check(v)


def finite(check: Check) -> Check:
    """``check``, and not NaN or infinite."""

    def finite_check(v: Any) -> str | None:
        why = check(v)
        return why or (None if v == v and abs(v) != float("inf") else "must be a finite number")

    return finite_check


def optional_str(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and v) else "must be a non-empty string or null"


def tree_levels(v: Any) -> str | None:
    if not isinstance(v, list | tuple) or not v:
        return "must be a non-empty list of positive integers, one per tree level"
    if any(positive_int(x) for x in v):
        return f"every entry must be a positive integer, got {list(v)}"
    return None


def true_or_false(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else "must be a mapping"


def learning_rate(v: Any) -> str | None:
    if isinstance(v, list):  # RLlib's schedule: [[timestep, lr], ...]
        ok = all(isinstance(p, list | tuple) and len(p) == 2 and not finite(non_negative)(p[1]) for p in v)
        return None if v and ok else "must be a number > 0 or a schedule [[timestep, lr], ...]"
    return finite(positive)(v)


def env_id(v: Any) -> str | None:
    if (isinstance(v, str) and v) or isinstance(v, type):
        return None
    return "must be a registered env id (e.g. treerpo/Arithmetic-v0) or a ReasoningEnv class"


def check_fields(values: dict[str, Any], fields: dict[str, Any]) -> None:
    """ValueError naming the first field of ``fields`` (name -> settings.Field) whose value in ``values`` is
    bad."""
    for name, field in fields.items():
        if name in values:
            why = field.check(values[name])
            if why:
                raise ValueError(f"config field {name!r} = {values[name]!r}: {why}")
