"""Config files and values as users write them: YAML files, ``--set`` values, numbers in any notation. Pure.

A config file is one flat YAML mapping: algorithm fields (``settings.TreeRPOSettings`` plus RLlib's
AlgorithmConfig attributes), job fields (``settings.JobSettings``) and sections read by their own commands
(``SECTIONS``). :func:`load_config` reads a file and ``--set`` values and parts them; every error is one
ValueError naming the file, the field or the ``--set``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rllib_treerpo.config.settings import FIELDS, JOB_FIELDS, RLLIB_FIELD_CHECKS, Field

# Sections of a config file that are not fields: read by their own commands (`treerpo sweep`, the PPO
# baseline).
SECTIONS = ("sweep", "ppo")


_YAML11_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def numbers_as_written(value: Any) -> Any:
    """``"1e-4"`` -> 1e-4: YAML 1.1 (PyYAML) reads scientific notation without a dot as a string, users write
    it anyway. Applied to every value of a config (nested mappings and lists too); other strings are left
    alone."""
    if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: numbers_as_written(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers_as_written(v) for v in value]
    return value


def yaml_value(text: str, source: str) -> Any:
    """One value written as YAML (``--set field=value``); a YAML error is one ValueError naming ``source``."""
    import yaml

    try:
        return numbers_as_written(yaml.safe_load(text))
    except yaml.YAMLError as e:
        raise ValueError(
            f"{source}: not valid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"
        ) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing file or a YAML error is one ValueError naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return numbers_as_written(values)


def split_fields(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A flat config mapping -> (algorithm values, job values (JOB_FIELDS), sections (SECTIONS))."""
    algo = {}
    job = {}
    sections = {}
    for key, value in values.items():
        (job if key in JOB_FIELDS else sections if key in SECTIONS else algo)[key] = value
    return algo, job, sections


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None,
    set_algorithm_fields: Callable[[dict[str, Any], str], Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one loader of config files: the file's fields, then ``overrides`` (``--set``), over the caller's
    defaults.

    The algorithm fields of each source go to ``set_algorithm_fields(values, source)`` (so that an unknown key
    names its file or ``--set``); returns the job fields (later sources win) and the sections."""
    job: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for source, values in (
        (str(path), read_config_file(path) if path is not None else {}),
        ("--set", numbers_as_written(dict(overrides or {}))),
    ):
        algo_values, job_values, section_values = split_fields(values)
        set_algorithm_fields(algo_values, source)
        job.update(job_values)
        sections.update(section_values)
    return job, sections


def coerce_numbers(values: dict[str, Any], fields: dict[str, Field]) -> dict[str, Any]:
    """A number written as a string (YAML 1.1 reads ``1e-4`` as one; a quoted ``"32"``) becomes that number
    when the string fails its field's check and the number passes it; anything else is left for the check to
    name."""
    out = dict(values)
    for name, value in values.items():
        field = fields.get(name)
        if field is None or not isinstance(value, str) or field.check(value) is None:
            continue
        for convert in (int, float):
            try:
                number = convert(value.strip())
            except ValueError:
                continue
            if field.check(number) is None:
                out[name] = number
                break
    return out


def fields_markdown() -> str:
    """docs/fields.md: every field of a config file with its default and meaning, from settings.py (tests
    check that the file is current: ``treerpo fields > docs/fields.md`` rewrites it)."""
    import yaml

    def default(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")

    parts = [
        "# Config fields\n\nEvery key a config file (or `--set`, or `TreeRPOConfig.training(...)`) takes, "
        "with its default: the embedded CPU default that `make train` runs. Generated from "
        "`rllib_treerpo/config/settings.py` by `treerpo fields > docs/fields.md`; a test keeps it current. "
        "Any other public RLlib `AlgorithmConfig` attribute is accepted too (RLlib validates it).\n"
    ]
    for title, fields in (
        ("TreeRPO's fields (`TreeRPOConfig`)", FIELDS),
        ("RLlib fields TreeRPO reads (checked by name)", RLLIB_FIELD_CHECKS),
        ("Job fields (`treerpo train`)", JOB_FIELDS),
    ):
        parts.append(f"\n## {title}\n\n| field | default | meaning |\n|---|---|---|\n")
        for name, field in fields.items():
            doc = " ".join(field.doc.split()).replace("|", "\\|")
            parts.append(f"| `{name}` | `{default(field.default)}` | {doc} |\n")
    return "".join(parts)
