"""The job's settings and the loader of flat config files.

A config file in configs/ is one flat YAML mapping: TreeRPO's algorithm fields and RLlib's AlgorithmConfig
attributes (-> :class:`TreeRPOConfig`), the job's fields (``JOB_FIELDS``: iterations, checkpoints, held-out
evaluation, which algorithm, the embedded model's settings -> :class:`JobConfig`) and optional sections read
by their own commands (``sweep:``, ``ppo:``). :func:`load_run_config` splits it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rllib_treerpo.config.checks import check_fields
from rllib_treerpo.config.config_files import coerce_numbers, load_config
from rllib_treerpo.config.settings import FIELDS, JOB_FIELDS, RLLIB_FIELD_CHECKS, JobSettings, set_defaults
from rllib_treerpo.learner.precision import resolve_config_dtype
from rllib_treerpo.rllib.config import TreeRPOConfig

# The keys tiny_model and warmstart take (rllib_treerpo/models/tiny.py build_tiny_model,
# warmstart.embedded_model).
TINY_MODEL_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions")
WARMSTART_KEYS = {
    "steps": int,
    "batch_size": int,
    "lr": float,
    "error_rate": float,
    "demos": int,
    "seed": int,
}


class JobConfig(JobSettings):
    """The `treerpo train` job's settings (declared in :class:`rllib_treerpo.config.settings.JobSettings`),
    checked."""

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(JOB_FIELDS)
        if unknown:
            raise ValueError(f"unknown job field {sorted(unknown)[0]!r}; job fields: {sorted(JOB_FIELDS)}")
        set_defaults(self, JobSettings)
        for name, value in coerce_numbers(values, JOB_FIELDS).items():
            setattr(self, name, value)
        check_fields(self.to_flat_dict(), JOB_FIELDS)
        self._check_embedded_model()

    def _check_embedded_model(self) -> None:
        """tiny_model and warmstart: known keys with numbers in range (else the warm start fails mid-job)."""
        kinds = {"tiny_model": dict.fromkeys(TINY_MODEL_KEYS, int), "warmstart": WARMSTART_KEYS}
        for name, keys in kinds.items():
            for key, value in getattr(self, name).items():
                if key not in keys:
                    raise ValueError(f"config field {name!r}: unknown key {key!r}; keys: {list(keys)}")
                number = isinstance(value, keys[key] | int) and not isinstance(value, bool)
                low, high = (0, 1) if key == "error_rate" else (0, None) if key == "seed" else (1e-300, None)
                if not number or not (low <= value and (high is None or value <= high)):
                    kind = "an integer" if keys[key] is int else "a number"
                    where = f"in [{low}, {high}]" if high else ">= 0" if low == 0 else "> 0"
                    raise ValueError(f"config field {name!r}: {key} = {value!r} must be {kind} {where}")
        tiny = self.tiny_model
        if tiny.get("hidden_size", 96) % tiny.get("num_heads", 4):
            raise ValueError(
                f"config field 'tiny_model': hidden_size must be a multiple of num_heads, got {tiny}"
            )

    def to_flat_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in JOB_FIELDS}


def load_run_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, announce: Any = print
) -> tuple[TreeRPOConfig, JobConfig, dict[str, Any]]:
    """Defaults, then the file's fields, then ``overrides`` (``--set``): the validated algorithm config, job
    config and the file's sections (``sweep``, ``ppo``). Errors name the file or ``--set`` and the field.
    ``dtype: auto`` is resolved here (precision.resolve_config_dtype: the choice and why go to
    ``announce``)."""
    config = TreeRPOConfig()
    job, sections = load_config(
        path, overrides, lambda values, source: config.update_from_flat_dict(values, source=source)
    )
    job_config = JobConfig(**job)
    config.check_values(job_config.algorithm)  # a bad value names itself (evaluation_duration: auto)
    apply_job_evaluation(config, job_config)  # the job's checked eval_* fields: valid RLlib values
    resolve_config_dtype(config, announce)
    return config, job_config, sections


# RLlib's evaluation settings that a config file sets through the job's fields (one vocabulary for
# `treerpo train` and `treerpo sweep`; Python and tune.run users set RLlib's names).
JOB_EVALUATION_FIELDS = {
    "evaluation_interval": "eval_every",
    "evaluation_duration": "eval_every_problems",
    "evaluation_samples": "eval_samples",
    "evaluation_config": "eval_env_config",
}


def apply_job_evaluation(config: TreeRPOConfig, job: JobConfig) -> None:
    """The held-out evaluation along training (eval_every, eval_every_problems, eval_samples,
    eval_env_config) as RLlib's evaluation settings, which TreeRPO's Algorithm honours (so a sweep's trials
    report ``evaluation/pass@1``). An RLlib evaluation field given in the file that disagrees is one line
    naming the job field to set instead."""
    wanted = {
        "evaluation_interval": job.eval_every or None,
        "evaluation_duration": job.eval_every_problems,
        "evaluation_samples": job.eval_samples,
        "evaluation_config": {"env_config": dict(job.eval_env_config)},
    }
    fields = {**FIELDS, **RLLIB_FIELD_CHECKS}
    for name, value in wanted.items():
        given = getattr(config, name)
        if given != fields[name].default and given != value:
            raise ValueError(
                f"config field {name!r} = {given!r}: in a config file the held-out evaluation along training "
                f"is set by the job field {JOB_EVALUATION_FIELDS[name]!r} (it sets {name}; docs/fields.md)"
            )
        setattr(config, name, value)


def flat_config(config: TreeRPOConfig, job: JobConfig) -> dict[str, Any]:
    """One flat mapping of a run's resolved settings (a run folder's config.yaml, what ``--resume`` reads)."""
    return {**config.to_flat_dict(), **job.to_flat_dict()}
