"""The job's settings and the loader of flat config files.

A config file in configs/ is one flat YAML mapping: TreeRPO's algorithm fields and RLlib's AlgorithmConfig
attributes (-> :class:`TreeRPOConfig`), the job's fields (``JOB_FIELDS``: iterations, checkpoints, held-out
evaluation, which algorithm, the embedded model's settings -> :class:`JobConfig`) and optional sections read by
their own commands (``sweep:``, ``ppo:``). :func:`load_run_config` splits it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rllib_treerpo.rllib.algorithm import TreeRPOConfig
from rllib_treerpo.settings import (
    JOB_FIELDS,
    check_fields,
    default_value,
    numbers_as_written,
    read_config_file,
    split_fields,
)


class JobConfig:
    """The `treerpo train` job's fields (``JOB_FIELDS``), as attributes."""

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(JOB_FIELDS)
        if unknown:
            raise ValueError(f"unknown job field {sorted(unknown)[0]!r}; job fields: {sorted(JOB_FIELDS)}")
        for name, field in JOB_FIELDS.items():
            setattr(self, name, values[name] if name in values else default_value(field))
        check_fields(self.to_flat_dict(), JOB_FIELDS)

    def to_flat_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in JOB_FIELDS}


def load_run_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> tuple[TreeRPOConfig, JobConfig, dict[str, Any]]:
    """Defaults, then the file's fields, then ``overrides`` (``--set``): the validated algorithm config, job
    config and the file's sections (``sweep``, ``ppo``). Errors name the file or ``--set`` and the field."""
    config = TreeRPOConfig()
    job: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for source, values in (
        (str(path), read_config_file(path) if path is not None else {}),
        ("--set", numbers_as_written(dict(overrides or {}))),
    ):
        algo_values, job_values, section_values = split_fields(values)
        config.update_from_flat_dict(algo_values, source=source)
        job.update(job_values)
        sections.update(section_values)
    config.validate_fields()
    job_config = JobConfig(**job)
    if job_config.algorithm == "TreeRPO":
        config.check_treerpo_batching()
    return config, job_config, sections


def flat_config(config: TreeRPOConfig, job: JobConfig) -> dict[str, Any]:
    """One flat mapping of a run's resolved settings (a run folder's config.yaml, what ``--resume`` reads)."""
    return {**config.to_flat_dict(), **job.to_flat_dict()}
