"""`treerpo sweep CONFIG [--output DIR] [--resume]`: a Ray Tune search over TreeRPO config fields.

CONFIG is a TreeRPO YAML (flat config fields, as for `treerpo train`) plus a ``sweep:`` section::

    sweep:
      space:                                  # config field -> one Tune domain
        tau: {grid_search: [0.0, 0.1]}        # every value (grid: trials = product x num_samples)
        lr: {loguniform: [1.0e-5, 1.0e-3]}    # sampled per trial; also uniform: [lo, hi], randint: [lo, hi]
        branching: {choice: [[4], [2, 2]]}    # one of the values, sampled per trial
        env_config.num_ops: {grid_search: [1, 2]}   # a key inside a mapping field
      metric: reward/mean                     # any training result key (default reward/mean)
      mode: max                               # max or min
      num_samples: 1                          # repetitions of the grid (samples of the random domains)
      iterations: 5                           # training iterations per trial (default: the iterations field)
      scheduler: asha                         # optional early stopping: ASHA on training_iteration
      grace_period: 1                         # ASHA: iterations before a trial can be stopped
      max_concurrent_trials: 2                # optional cap (default: as many as the CPUs allow)

Every swept field is checked before Ray starts: an unknown field, a job-only field, a malformed domain or a
value the field rejects is a ValueError naming it. With ``model_name_or_path: null`` the tiny model is built
and warm-started once (cached), exactly as `treerpo train` does, and every trial starts from it.

Trials run the registered "TreeRPO" trainable (``tune.Tuner("TreeRPO", param_space=config.to_dict() with the
space merged)``), stop at ``iterations``, and checkpoint every ``checkpoint_every`` iterations and at the end,
so ``--resume`` continues an interrupted sweep (``Tuner.restore``: unfinished trials restart from their last
checkpoint, errored ones are retried).

Output folder:
  sweep_config.yaml  the CONFIG as given (plus --set overrides)
  tune/              Tune's experiment folder (trial folders, checkpoints, experiment state)
  trials.csv         one row per trial: swept values, last and best metric, iterations, seconds, status
                     (done; stopped: early by ASHA; unfinished: the sweep was interrupted; error)
  best_config.yaml   the best trial's config as flat TreeRPOConfig fields (`treerpo train best_config.yaml`)
  summary.json       metric, mode, best value, parameters and checkpoint (`treerpo eval --model` takes it),
                     trial counts, interrupted, seconds

Ctrl-C stops the sweep cleanly (Tune saves its state): the results so far are written, and
``--resume`` continues it.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rllib_treerpo.config import FIELDS, TreeRPOConfig

__all__ = ["SweepSpec", "load_sweep", "run_sweep", "search_space"]

DOMAINS = ("grid_search", "choice", "uniform", "loguniform", "randint")
SWEEP_KEYS = ("space", "metric", "mode", "num_samples", "iterations", "scheduler", "grace_period",
              "max_concurrent_trials")
# Fields of the `treerpo train` job or of the one-off tiny model: a Tune trial never reads them.
NOT_SWEEPABLE = {
    "algorithm": "a sweep runs TreeRPO trials (GRPO is TreeRPO with branching [G]: sweep branching)",
    "iterations": "set sweep.iterations instead",
    "checkpoint_every": "it only sets how often trials checkpoint",
    "eval_problems": "trials do no held-out evaluation",
    "eval_samples": "trials do no held-out evaluation",
    "eval_env_config": "trials do no held-out evaluation",
    "tiny_model": "the tiny model is built once, before the sweep",
    "warmstart": "the tiny model is built once, before the sweep",
}
EXPERIMENT = "tune"


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


def _known_fields(config: TreeRPOConfig) -> list[str]:
    return sorted(set(FIELDS) | {k for k in vars(config) if not k.startswith("_")})


def _check_value(config: TreeRPOConfig, key: str, value: Any) -> None:
    """A swept value must pass the field's own check (TreeRPO fields; RLlib fields are checked by RLlib)."""
    if key in FIELDS:
        why = FIELDS[key].check(value)
        if why:
            raise ValueError(f"sweep.space.{key}: value {value!r} {why}")


def _validate_space(config: TreeRPOConfig, space: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{source}: sweep.space must be a non-empty mapping of config field -> domain, e.g. "
                         "{tau: {grid_search: [0.0, 0.1]}}")
    known = _known_fields(config)
    out = {}
    for key, domain in space.items():
        head, _, sub = str(key).partition(".")
        if head not in known:
            close = difflib.get_close_matches(head, known, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{source}: sweep over unknown config field {head!r}{hint}")
        if head in NOT_SWEEPABLE:
            raise ValueError(f"{source}: config field {head!r} cannot be swept: {NOT_SWEEPABLE[head]}")
        if sub and not isinstance(getattr(config, head), dict):
            raise ValueError(f"{source}: sweep.space.{key}: {head!r} is not a mapping field, so it has no key {sub!r}")
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise ValueError(f"{source}: sweep.space.{key} must be a mapping with exactly one of {list(DOMAINS)}, "
                             f"e.g. {{grid_search: [0.0, 0.1]}}; got {domain!r}")
        kind, args = next(iter(domain.items()))
        if kind in ("grid_search", "choice"):
            if not isinstance(args, list) or not args:
                raise ValueError(f"{source}: sweep.space.{key}.{kind} must be a non-empty list of values")
            if not sub:
                for value in args:
                    _check_value(config, head, value)
        else:
            numbers = isinstance(args, list) and len(args) == 2 and all(
                isinstance(a, int | float) and not isinstance(a, bool) for a in args)
            if not numbers or not args[0] < args[1]:
                raise ValueError(f"{source}: sweep.space.{key}.{kind} must be [low, high] with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{source}: sweep.space.{key}.loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ValueError(f"{source}: sweep.space.{key}.randint needs integer bounds, got {args!r}")
            if not sub:
                for value in args:
                    _check_value(config, head, value)
        out[str(key)] = {kind: args}
    return out


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[TreeRPOConfig, SweepSpec]:
    """Read CONFIG: the TreeRPO config (validated) and its ``sweep:`` section (validated). Starts no Ray."""
    source = str(path)
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of config fields plus a sweep: section")
    raw = values.get("sweep")
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: no `sweep:` section (a mapping with space, metric, mode, ...); see "
                         "configs/sweep_tiny.yaml")
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SWEEP_KEYS, n=2)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{source}: unknown sweep key {unknown[0]!r}{hint} (valid: {list(SWEEP_KEYS)})")
    config = TreeRPOConfig.from_yaml(path, overrides)
    if getattr(config, "algorithm", "TreeRPO") != "TreeRPO":
        raise ValueError(f"{source}: config field 'algorithm' = {config.algorithm!r}: `treerpo sweep` runs TreeRPO "
                         "trials only")
    spec = SweepSpec(space=_validate_space(config, raw.get("space"), source))
    spec.metric = raw.get("metric", spec.metric)
    if not isinstance(spec.metric, str) or not spec.metric:
        raise ValueError(f"{source}: sweep.metric must be a result key such as reward/mean")
    spec.mode = raw.get("mode", spec.mode)
    if spec.mode not in ("max", "min"):
        raise ValueError(f"{source}: sweep.mode must be max or min, got {spec.mode!r}")
    for key in ("num_samples", "grace_period"):
        value = raw.get(key, getattr(spec, key))
        if not _is_pos_int(value):
            raise ValueError(f"{source}: sweep.{key} must be a positive integer, got {value!r}")
        setattr(spec, key, value)
    spec.iterations = raw.get("iterations", config.iterations)
    if not _is_pos_int(spec.iterations):
        raise ValueError(f"{source}: sweep.iterations must be a positive integer, got {spec.iterations!r}")
    spec.scheduler = raw.get("scheduler")
    if spec.scheduler not in (None, "asha", "fifo"):
        raise ValueError(f"{source}: sweep.scheduler must be asha, fifo or null, got {spec.scheduler!r}")
    spec.max_concurrent_trials = raw.get("max_concurrent_trials")
    if spec.max_concurrent_trials is not None and not _is_pos_int(spec.max_concurrent_trials):
        raise ValueError(f"{source}: sweep.max_concurrent_trials must be a positive integer or null")
    return config, spec


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

    Only the entries that differ from TreeRPOConfig's defaults are kept, minus the job-only fields a trial
    never reads (NOT_SWEEPABLE): the algorithm fills in the rest (``update_from_dict`` on its default
    config), and Tune's console shows a short, readable config per trial.
    """
    full = config.to_dict()
    defaults = TreeRPOConfig().to_dict()
    param_space = {k: v for k, v in full.items()
                   if k not in NOT_SWEEPABLE and (k not in defaults or not _same(v, defaults[k]))}
    for key, domain in spec.space.items():
        (kind, args), = domain.items()
        head, _, sub = key.partition(".")
        if sub:
            param_space[head] = {**(full.get(head) or {}), sub: _domain(kind, args)}
        else:
            param_space[head] = _domain(kind, args)
    return param_space


def _lookup(d: dict[str, Any], key: str) -> Any:
    """``d[key]`` for a flat key or a "/"-path into nested dicts (Tune flattens result keys with "/")."""
    if key in d:
        return d[key]
    node: Any = d
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _swept_value(trial_config: dict[str, Any], key: str) -> Any:
    head, _, sub = key.partition(".")
    value = trial_config.get(head)
    return value.get(sub) if sub and isinstance(value, dict) else value


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def run_sweep(
    config_path: str | Path,
    output: str | Path | None = None,
    *,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    verbose: int = 1,
) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the sweep; writes the output folder (module docstring).

    Returns summary.json's content plus ``output``. Everything about CONFIG is validated before Ray starts.
    """
    config, spec = load_sweep(config_path, overrides)
    out = Path(output if output is not None else Path("runs") / f"sweep_{Path(config_path).stem}").resolve()
    exp_dir = out / EXPERIMENT

    import ray
    from ray import tune

    import rllib_treerpo  # noqa: F401  registers the "TreeRPO" trainable

    if resume and not tune.Tuner.can_restore(str(exp_dir)):
        raise ValueError(f"--resume: no sweep to resume in {out} (no Tune experiment state under {exp_dir})")
    if not resume and exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
        raise ValueError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --output")

    out.mkdir(parents=True, exist_ok=True)
    if config.model_name_or_path is None:
        from rllib_treerpo.train import prepare_tiny_model

        config.model_name_or_path = prepare_tiny_model(config)
    config.validate_fields()
    with open(config_path) as f:
        raw = yaml.safe_load(f) or {}
    raw.update(overrides or {})
    raw["model_name_or_path"] = config.model_name_or_path
    (out / "sweep_config.yaml").write_text(_dump_yaml(raw))

    started_ray = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR", num_cpus=max(2, os.cpu_count() or 2))
        started_ray = True
    start = time.perf_counter()
    try:
        with _classic_tune_console():
            if resume:
                print(f"sweep: resuming {exp_dir}", flush=True)
                tuner = tune.Tuner.restore(str(exp_dir), trainable="TreeRPO", resume_unfinished=True,
                                           resume_errored=True)
            else:
                tuner = _new_tuner(config, spec, exp_dir.parent, verbose)
            results = tuner.fit()
        summary = _write_results(results, config, spec, out)
    finally:
        if started_ray:
            ray.shutdown()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["output"] = str(out)
    return summary


def _new_tuner(config: TreeRPOConfig, spec: SweepSpec, storage: Path, verbose: int):
    from ray import tune

    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.iterations,
                                  grace_period=min(spec.grace_period, spec.iterations))
    every = config.checkpoint_every
    # A table of the swept fields and the metric only (the default console would print every RLlib setting).
    reporter = tune.CLIReporter(
        parameter_columns={k.replace(".", "/"): k for k in spec.space},
        metric_columns={spec.metric: spec.metric, "training_iteration": "iter", "time_total_s": "seconds"},
        sort_by_metric=True, max_report_frequency=15)
    return tune.Tuner(
        "TreeRPO",
        param_space=search_space(config, spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=scheduler, max_concurrent_trials=spec.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=str(storage), stop={"training_iteration": spec.iterations},
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=every if every else 0,
                                                    checkpoint_at_end=True, num_to_keep=1),
            verbose=verbose, progress_reporter=reporter),
    )


@contextlib.contextmanager
def _classic_tune_console():
    """Tune's classic console (its CLIReporter honours the chosen columns), for this sweep only."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def _write_results(results, config: TreeRPOConfig, spec: SweepSpec, out: Path) -> dict[str, Any]:
    """trials.csv, best_config.yaml; returns the summary."""
    keys = list(spec.space)
    rows, best_i, best_v = [], None, None
    ordered = sorted(results, key=lambda r: str((r.metrics or {}).get("trial_id", "")))
    for i, result in enumerate(ordered):  # in trial order, so ties and the CSV do not depend on Tune's order
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        values = []
        if history is not None and spec.metric in history.columns:
            values = [v for v in (_number(x) for x in history[spec.metric].tolist()) if v is not None]
        last = _number(_lookup(metrics, spec.metric))
        best = (max(values) if spec.mode == "max" else min(values)) if values else last
        row = {"trial": i, "trial_id": metrics.get("trial_id", "")}
        row.update({k: _swept_value(result.config or {}, k) for k in keys})
        iterations = int(metrics.get("training_iteration") or 0)
        row.update({f"{spec.metric} (last)": last, f"{spec.metric} (best)": best, "iterations": iterations,
                    "seconds": round(float(metrics.get("time_total_s") or 0.0), 1),
                    "status": "error" if result.error else "done" if iterations >= spec.iterations else "stopped",
                    "path": result.path})
        rows.append(row)
        if last is not None and (best_v is None or (last > best_v if spec.mode == "max" else last < best_v)):
            best_i, best_v = i, last
    expected = expected_trials(spec)
    interrupted = len(rows) < expected or results.num_terminated + results.num_errors < len(rows)
    if interrupted:  # Ctrl-C (or a lost driver): Tune saved its state, unfinished trials can continue
        for row in rows:
            if row["status"] == "stopped":
                row["status"] = "unfinished"
    if rows:
        with open(out / "trials.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()})
    summary: dict[str, Any] = {
        "metric": spec.metric, "mode": spec.mode, "scope": "last", "iterations": spec.iterations,
        "trials": len(rows), "expected_trials": expected, "interrupted": interrupted,
        "finished_trials": sum(r["status"] in ("done", "stopped") for r in rows),
        "errored_trials": sum(r["status"] == "error" for r in rows),
        "best_metric": best_v, "best_params": None, "best_trial": None,
    }
    if best_i is None:
        seen = sorted(_flat_keys(next((r.metrics for r in results if r.metrics), {}) or {}))
        close = difflib.get_close_matches(spec.metric, seen, n=5, cutoff=0.4)
        summary["error"] = (f"no trial reported sweep.metric {spec.metric!r}"
                            + (f"; close result keys: {close}" if close else ""))
        print(f"sweep: {summary['error']}", flush=True)
        return summary
    best_config = ordered[best_i].config or {}
    summary["best_params"] = {k: rows[best_i][k] for k in keys}
    summary["best_trial"] = rows[best_i]["trial_id"]
    checkpoint = ordered[best_i].checkpoint  # the trial's last one: `treerpo eval --model` takes it
    summary["best_checkpoint"] = checkpoint.path if checkpoint is not None else None
    flat = config.to_flat_dict()
    flat.update({k: copy.deepcopy(best_config[k]) for k in flat if k in best_config})
    for key in keys:  # a swept RLlib field outside to_flat_dict
        head = key.partition(".")[0]
        if head in best_config:
            flat[head] = copy.deepcopy(best_config[head])
    header = (f"# Best trial of the sweep in {out} ({spec.metric} = {best_v}, mode {spec.mode}, last iteration).\n"
              f"# Swept: {summary['best_params']}\n")
    (out / "best_config.yaml").write_text(header + _dump_yaml(flat))
    return summary


class _ConfigDumper(yaml.SafeDumper):
    """Flat YAML as in configs/: short lists inline, strings with newlines double-quoted ("\\n")."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = '"' if "\n" in value or "\t" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ConfigDumper.add_representer(str, _represent_str)


def _dump_yaml(values: dict[str, Any]) -> str:
    return yaml.dump(values, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=None, width=110)


def expected_trials(spec: SweepSpec) -> int:
    """Trials of the sweep: num_samples x the product of the grid sizes."""
    n = spec.num_samples
    for domain in spec.space.values():
        if "grid_search" in domain:
            n *= len(domain["grid_search"])
    return n


def _flat_keys(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat_keys(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}"
