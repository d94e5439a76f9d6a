"""How a setting is declared: its default, meaning and check, once (settings.py declares them all). Pure."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from rllib_treerpo.config.checks import Check

__all__ = ["Field", "declared", "default_value", "set_defaults", "setting"]


@dataclass(frozen=True)
class Field:
    """One setting's default, meaning and check (the check returns why a value is bad, or None)."""

    default: Any
    doc: str
    check: Check

    def fresh_default(self) -> Any:
        """A copy of the default: lists and mappings are never shared between configs."""
        return copy.deepcopy(self.default)


def setting(default: Any, doc: str, check: Check) -> Any:
    """Declares a setting in a settings class body: ``tau: float = setting(0.1, "...", non_negative)``."""
    return Field(default, doc, check)


def declared(cls: type) -> dict[str, Field]:
    """The settings a class declares, in declaration order (base classes first)."""
    out: dict[str, Field] = {}
    for klass in reversed(cls.__mro__):
        out.update({name: v for name, v in vars(klass).items() if isinstance(v, Field)})
    return out


def default_value(field: Field) -> Any:
    """A fresh copy of a field's default."""
    return field.fresh_default()


def set_defaults(obj: Any, settings_class: type) -> None:
    """Sets every setting ``settings_class`` declares on ``obj`` to its default (fresh copies)."""
    for name, field in declared(settings_class).items():
        setattr(obj, name, field.fresh_default())
