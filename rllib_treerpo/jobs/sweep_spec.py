"""The ``sweep:`` section of a config file: validated before Ray starts, and turned into Tune's search space.

See jobs/sweep.py for the file format. Only algorithm fields (TreeRPO's own and RLlib's) can be swept: a job
field (iterations, evaluation, the embedded model's settings; ``settings.JOB_FIELDS``) is the job's, not a
trial's.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rllib_treerpo.config.settings import FIELDS, JOB_FIELDS
from rllib_treerpo.jobs.config import JobConfig, load_run_config
from rllib_treerpo.rllib.config import TreeRPOConfig

__all__ = ["SweepSpec", "expected_trials", "load_sweep", "search_space"]

HELD_OUT_METRIC = "evaluation/pass@1"  # TreeRPO's evaluation results (rllib/evaluation.py)
EVALUATION_PREFIX = "evaluation/"
DOMAINS = ("grid_search", "choice", "uniform", "loguniform", "randint")
SWEEP_KEYS = (
    "space",
    "metric",
    "mode",
    "num_samples",
    "iterations",
    "scheduler",
    "grace_period",
    "max_concurrent_trials",
)


@dataclass
class SweepSpec:
    """The ``sweep:`` section, validated."""

    space: dict[str, dict[str, Any]]
    metric: str = "reward/mean"
    mode: str = "max"
    num_samples: int = 1
    iterations: int = 20
    scheduler: str | None = None
    grace_period: int = 1
    max_concurrent_trials: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_value(config: TreeRPOConfig, key: str, value: Any) -> None:
    """A swept value must pass the field's own check (TreeRPO fields; RLlib fields are checked by RLlib)."""
    if key in FIELDS:
        why = FIELDS[key].check(value)
        if why:
            raise ValueError(f"sweep.space.{key}: value {value!r} {why}")


def _validate_space(config: TreeRPOConfig, space: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(space, dict) or not space:
        raise ValueError(
            f"{source}: sweep.space must be a non-empty mapping of config field -> domain, e.g. "
            "{tau: {grid_search: [0.0, 0.1]}}"
        )
    known = config.known_fields()
    out = {}
    for key, domain in space.items():
        head, _, sub = str(key).partition(".")
        if head in JOB_FIELDS:
            raise ValueError(
                f"{source}: config field {head!r} is a job field, not an algorithm field: a sweep's "
                "trials do not read it (sweep algorithm fields; sweep.iterations sets the length)"
            )
        if head not in known:
            close = difflib.get_close_matches(head, known, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{source}: sweep over unknown config field {head!r}{hint}")
        if sub and not isinstance(vars(config).get(head), dict):  # the config's fields are its attributes
            raise ValueError(
                f"{source}: sweep.space.{key}: {head!r} is not a mapping field, so it has no key {sub!r}"
            )
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise ValueError(
                f"{source}: sweep.space.{key} must be a mapping with exactly one of {list(DOMAINS)}, "
                f"e.g. {{grid_search: [0.0, 0.1]}}; got {domain!r}"
            )
        kind, args = next(iter(domain.items()))
        if kind in ("grid_search", "choice"):
            if not isinstance(args, list) or not args:
                raise ValueError(f"{source}: sweep.space.{key}.{kind} must be a non-empty list of values")
            if not sub:
                for value in args:
                    _check_value(config, head, value)
        else:
            numbers = (
                isinstance(args, list)
                and len(args) == 2
                and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
            )
            if not numbers or not args[0] < args[1]:
                raise ValueError(
                    f"{source}: sweep.space.{key}.{kind} must be [low, high] with low < high, got {args!r}"
                )
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{source}: sweep.space.{key}.loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ValueError(f"{source}: sweep.space.{key}.randint needs integer bounds, got {args!r}")
            if not sub:
                for value in args:
                    _check_value(config, head, value)
        out[str(key)] = {kind: args}
    return out


def load_sweep(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[TreeRPOConfig, JobConfig, SweepSpec]:
    """Read CONFIG: the algorithm config and job config (validated) and its ``sweep:`` section (validated).
    Starts no Ray."""
    source = str(path)
    config, job, sections = load_run_config(path, overrides)
    raw = sections.get("sweep")
    if not isinstance(raw, dict):
        raise ValueError(
            f"{source}: no `sweep:` section (a mapping with space, metric, mode, ...); see "
            "configs/sweep_tiny.yaml"
        )
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SWEEP_KEYS, n=2)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{source}: unknown sweep key {unknown[0]!r}{hint} (valid: {list(SWEEP_KEYS)})")
    if job.algorithm != "TreeRPO":
        raise ValueError(
            f"{source}: config field 'algorithm' = {job.algorithm!r}: `treerpo sweep` runs TreeRPO "
            "trials only (GRPO is TreeRPO with branching [G]: sweep branching)"
        )
    spec = SweepSpec(space=_validate_space(config, raw.get("space"), source))
    # Held-out pass@1 when the trials evaluate (eval_every: RLlib's evaluation_interval), else the training
    # reward.
    spec.metric = raw.get("metric", HELD_OUT_METRIC if job.eval_every else spec.metric)
    if not isinstance(spec.metric, str) or not spec.metric:
        raise ValueError(f"{source}: sweep.metric must be a result key such as {HELD_OUT_METRIC}")
    spec.mode = raw.get("mode", spec.mode)
    if spec.mode not in ("max", "min"):
        raise ValueError(f"{source}: sweep.mode must be max or min, got {spec.mode!r}")
    for key in ("num_samples", "grace_period"):
        value = raw.get(key, getattr(spec, key))
        if not _is_pos_int(value):
            raise ValueError(f"{source}: sweep.{key} must be a positive integer, got {value!r}")
        setattr(spec, key, value)
    spec.iterations = raw.get("iterations", job.iterations)
    if not _is_pos_int(spec.iterations):
        raise ValueError(f"{source}: sweep.iterations must be a positive integer, got {spec.iterations!r}")
    spec.scheduler = raw.get("scheduler")
    if spec.scheduler not in (None, "asha", "fifo"):
        raise ValueError(f"{source}: sweep.scheduler must be asha, fifo or null, got {spec.scheduler!r}")
    _check_held_out_metric(spec, job, source)
    spec.max_concurrent_trials = raw.get("max_concurrent_trials")
    if spec.max_concurrent_trials is not None and not _is_pos_int(spec.max_concurrent_trials):
        raise ValueError(f"{source}: sweep.max_concurrent_trials must be a positive integer or null")
    return config, job, spec


def _check_held_out_metric(spec: SweepSpec, job: JobConfig, source: str) -> None:
    """A held-out metric (``evaluation/...``) needs the trials to evaluate, and the last iteration to be an
    evaluated one: the trials' last result would otherwise carry an older evaluation."""
    if not spec.metric.startswith(EVALUATION_PREFIX):
        return
    if not job.eval_every:
        raise ValueError(
            f"{source}: sweep.metric {spec.metric!r} is a held-out metric, but eval_every is 0 (no "
            "evaluation along training); set eval_every (and eval_every_problems, eval_samples)"
        )
    if spec.scheduler == "asha" and spec.grace_period < job.eval_every:
        raise ValueError(
            f"{source}: sweep.grace_period {spec.grace_period} < eval_every {job.eval_every}: ASHA would "
            f"stop trials on the starting policy's {spec.metric!r} (every trial's); set grace_period >= "
            "eval_every"
        )
    if spec.iterations % job.eval_every:
        raise ValueError(
            f"{source}: sweep.iterations {spec.iterations} is not a multiple of eval_every {job.eval_every}: "
            f"the trials' last {spec.metric!r} would be that of iteration "
            f"{spec.iterations - spec.iterations % job.eval_every}"
        )


def _domain(kind: str, args: Any):
    from ray import tune

    if kind == "grid_search":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*args)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # noqa: BLE001 - values without a plain equality count as different
        return False


def search_space(config: TreeRPOConfig, spec: SweepSpec) -> dict[str, Any]:
    """The trials' ``param_space``: ``config.to_dict()`` with every swept field replaced by its Tune domain
    (dotted keys go one level into a mapping field).

    Only the entries that differ from TreeRPOConfig's defaults are kept: the algorithm fills in the rest
    (``update_from_dict`` on its default config), and Tune's console shows a short, readable config per trial.
    """
    full = config.to_dict()
    defaults = TreeRPOConfig().to_dict()
    param_space = {k: v for k, v in full.items() if k not in defaults or not _same(v, defaults[k])}
    for key, domain in spec.space.items():
        ((kind, args),) = domain.items()
        head, _, sub = key.partition(".")
        if sub:
            param_space[head] = {**(full.get(head) or {}), sub: _domain(kind, args)}
        else:
            param_space[head] = _domain(kind, args)
    return param_space


def expected_trials(spec: SweepSpec) -> int:
    """Trials of the sweep: num_samples x the product of the grid sizes."""
    n = spec.num_samples
    for domain in spec.space.values():
        if "grid_search" in domain:
            n *= len(domain["grid_search"])
    return n
