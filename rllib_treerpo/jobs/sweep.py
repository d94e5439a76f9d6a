"""`treerpo sweep CONFIG [--output DIR] [--resume]`: a Ray Tune search over TreeRPO config fields.

CONFIG is a TreeRPO YAML (flat config fields, as for `treerpo train`) plus a ``sweep:`` section::

    sweep:
      space:                                  # config field -> one Tune domain
        tau: {grid_search: [0.0, 0.1]}        # every value (grid: trials = product x num_samples)
        lr: {loguniform: [1.0e-5, 1.0e-3]}    # sampled per trial; also uniform: [lo, hi], randint: [lo, hi]
        branching: {choice: [[4], [2, 2]]}    # one of the values, sampled per trial
        env_config.num_ops: {grid_search: [1, 2]}   # a key inside a mapping field
      metric: evaluation/pass@1               # any result key; default: held-out pass@1 (reward/mean when
                                              # eval_every is 0); evaluation/* needs iterations to be a
                                              # multiple of eval_every
      mode: max                               # max or min
      num_samples: 1                          # repetitions of the grid (samples of the random domains)
      iterations: 5                           # training iterations per trial (default: the iterations field)
      scheduler: asha                         # optional early stopping: ASHA on training_iteration
      grace_period: 1                         # ASHA: iterations before a trial can be stopped
      max_concurrent_trials: 2                # optional cap (default: as many as the CPUs allow)

Trials evaluate on held-out problems as `treerpo train` does along training (the job fields eval_every,
eval_every_problems, eval_samples, eval_env_config become RLlib's evaluation settings, which TreeRPO honours:
rllib/evaluation.py); every result carries the latest evaluation under ``evaluation/``, so the metric and
ASHA can be held-out pass@1. Every swept field is checked before Ray starts: an unknown field, a job-only
field, a malformed domain or a value the field rejects is a ValueError naming it. With
``model_name_or_path: null`` the tiny model is built and warm-started once (cached), exactly as
`treerpo train` does, and every trial starts from it.

Trials run the registered "TreeRPO" trainable (``tune.Tuner("TreeRPO", param_space=config.to_dict() with the
space merged)``), stop at ``iterations``, and checkpoint every ``checkpoint_every`` iterations and at the end,
so ``--resume`` continues an interrupted sweep (``Tuner.restore``: unfinished trials restart from their last
checkpoint, errored ones are retried).

Output folder:
  sweep_config.yaml  the CONFIG as given (plus --set overrides)
  tune/              Tune's experiment folder (trial folders, checkpoints, experiment state)
  trials.csv         one row per trial: swept values, last and best metric, the last held-out pass@1, greedy
                     accuracy, response tokens and the iteration they were measured at, the last train
                     reward, iterations, seconds, status
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
from pathlib import Path
from typing import Any

import yaml

from rllib_treerpo.jobs.config import JobConfig, flat_config
from rllib_treerpo.jobs.sweep_spec import SweepSpec, expected_trials, load_sweep, search_space
from rllib_treerpo.rllib.config import TreeRPOConfig

__all__ = ["run_sweep"]

EXPERIMENT = "tune"
# trials.csv's held-out columns: name -> key under the results' `evaluation` (rllib/evaluation.py)
HELD_OUT = (
    ("pass@1", "pass@1"),
    ("greedy", "greedy_accuracy"),
    ("response tokens", "mean_response_tokens"),
    ("iteration", "iteration"),
)


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
    config, job, spec = load_sweep(config_path, overrides)
    out = Path(output if output is not None else Path("runs") / f"sweep_{Path(config_path).stem}").resolve()
    exp_dir = out / EXPERIMENT

    import ray
    from ray import tune

    from rllib_treerpo.jobs.ray_session import start_ray
    from rllib_treerpo.rllib import register

    register()  # the "TreeRPO" trainable

    if resume and not tune.Tuner.can_restore(str(exp_dir)):
        raise ValueError(f"--resume: no sweep to resume in {out} (no Tune experiment state under {exp_dir})")
    if not resume and exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
        raise ValueError(
            f"{out} already holds a sweep: pass --resume to continue it, or choose another --output"
        )

    out.mkdir(parents=True, exist_ok=True)
    if config.model_name_or_path is None:
        from rllib_treerpo.jobs.train import use_embedded_model

        use_embedded_model(config, job)
    config.check_values()
    with open(config_path) as f:
        raw = yaml.safe_load(f) or {}
    raw.update(overrides or {})
    raw["model_name_or_path"] = config.model_name_or_path
    (out / "sweep_config.yaml").write_text(_dump_yaml(raw))

    started_ray = start_ray()
    start = time.perf_counter()
    try:
        with _classic_tune_console():
            if resume:
                print(f"sweep: resuming {exp_dir}", flush=True)
                tuner = tune.Tuner.restore(
                    str(exp_dir), trainable="TreeRPO", resume_unfinished=True, resume_errored=True
                )
            else:
                tuner = _new_tuner(config, job, spec, exp_dir.parent, verbose)
            results = tuner.fit()
        summary = _write_results(results, config, job, spec, out)
    finally:
        if started_ray:
            ray.shutdown()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["output"] = str(out)
    return summary


def _new_tuner(config: TreeRPOConfig, job: JobConfig, spec: SweepSpec, storage: Path, verbose: int):
    from ray import tune

    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=spec.iterations,
            grace_period=min(spec.grace_period, spec.iterations),
        )
    every = job.checkpoint_every
    # A table of the swept fields and the metric only (the default console would print every RLlib setting).
    reporter = tune.CLIReporter(
        parameter_columns={k.replace(".", "/"): k for k in spec.space},
        metric_columns={spec.metric: spec.metric, "training_iteration": "iter", "time_total_s": "seconds"},
        sort_by_metric=True,
        max_report_frequency=15,
    )
    return tune.Tuner(
        "TreeRPO",
        param_space=search_space(config, spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            scheduler=scheduler,
            max_concurrent_trials=spec.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(storage),
            stop={"training_iteration": spec.iterations},
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_frequency=every if every else 0, checkpoint_at_end=True, num_to_keep=1
            ),
            verbose=verbose,
            progress_reporter=reporter,
        ),
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


def _write_results(
    results, config: TreeRPOConfig, job: JobConfig, spec: SweepSpec, out: Path
) -> dict[str, Any]:
    """trials.csv, best_config.yaml; returns the summary."""
    keys = list(spec.space)
    rows, best_i, best_v = [], None, None
    ordered = sorted(results, key=lambda r: str((r.metrics or {}).get("trial_id", "")))
    for i, result in enumerate(ordered):  # in trial order, so ties and the CSV do not depend on Tune's order
        row, last = _trial_row(i, result, spec)
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
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()}
                )
    summary: dict[str, Any] = {
        "metric": spec.metric,
        "mode": spec.mode,
        "scope": "last",
        "iterations": spec.iterations,
        "trials": len(rows),
        "expected_trials": expected,
        "interrupted": interrupted,
        "finished_trials": sum(r["status"] in ("done", "stopped") for r in rows),
        "errored_trials": sum(r["status"] == "error" for r in rows),
        "best_metric": best_v,
        "best_params": None,
        "best_trial": None,
    }
    if best_i is None:
        seen = sorted(_flat_keys(next((r.metrics for r in results if r.metrics), {}) or {}))
        close = difflib.get_close_matches(spec.metric, seen, n=5, cutoff=0.4)
        summary["error"] = f"no trial reported sweep.metric {spec.metric!r}" + (
            f"; close result keys: {close}" if close else ""
        )
        print(f"sweep: {summary['error']}", flush=True)
        return summary
    summary["best_params"] = {k: rows[best_i][k] for k in keys}
    summary["best_trial"] = rows[best_i]["trial_id"]
    checkpoint = ordered[best_i].checkpoint  # the trial's last one: `treerpo eval --model` takes it
    summary["best_checkpoint"] = checkpoint.path if checkpoint is not None else None
    _write_best_config(out, flat_config(config, job), ordered[best_i].config or {}, spec, summary)
    return summary


def _trial_row(i: int, result, spec: SweepSpec) -> tuple[dict[str, Any], float | None]:
    """One trials.csv row (swept values, last and best metric, iterations, status) and the last metric."""
    metrics = result.metrics or {}
    history = result.metrics_dataframe
    values = []
    if history is not None and spec.metric in history.columns:
        if spec.metric.startswith("evaluation/") and "evaluation/iteration" in history.columns:
            # the starting policy's evaluation (iteration 0) is every trial's: not a trial's best
            history = history[history["evaluation/iteration"] > 0]
        values = [v for v in (_number(x) for x in history[spec.metric].tolist()) if v is not None]
    last = _number(_lookup(metrics, spec.metric))
    best = (max(values) if spec.mode == "max" else min(values)) if values else last
    iterations = int(metrics.get("training_iteration") or 0)
    row = {"trial": i, "trial_id": metrics.get("trial_id", "")}
    row.update({k: _swept_value(result.config or {}, k) for k in spec.space})
    row.update(
        {
            f"{spec.metric} (last)": last,
            f"{spec.metric} (best)": best,
            # the held-out evaluation of the trial's last result (empty when the trials do not evaluate)
            **{f"held-out {name}": _number(_lookup(metrics, f"evaluation/{key}")) for name, key in HELD_OUT},
            "reward/mean (last)": _number(_lookup(metrics, "reward/mean")),
            "iterations": iterations,
            "seconds": round(float(metrics.get("time_total_s") or 0.0), 1),
            "status": "error" if result.error else "done" if iterations >= spec.iterations else "stopped",
            "path": result.path,
        }
    )
    return row, last


def _write_best_config(
    out: Path, flat: dict[str, Any], best_config: dict[str, Any], spec: SweepSpec, summary: dict[str, Any]
) -> None:
    """best_config.yaml: the run's flat config with the best trial's values (`treerpo train` takes it)."""
    flat.update({k: copy.deepcopy(best_config[k]) for k in flat if k in best_config})
    for key in spec.space:  # a swept RLlib field outside to_flat_dict
        head = key.partition(".")[0]
        if head in best_config:
            flat[head] = copy.deepcopy(best_config[head])
    header = (
        f"# Best trial of the sweep in {out} ({spec.metric} = {summary['best_metric']}, mode {spec.mode}, "
        f"last iteration).\n# Swept: {summary['best_params']}\n"
    )
    (out / "best_config.yaml").write_text(header + _dump_yaml(flat))


class _ConfigDumper(yaml.SafeDumper):
    """Flat YAML as in configs/: short lists inline, strings with newlines double-quoted ("\\n")."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = '"' if "\n" in value or "\t" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ConfigDumper.add_representer(str, _represent_str)


def _dump_yaml(values: dict[str, Any]) -> str:
    return yaml.dump(values, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=None, width=110)


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


def _flat_keys(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat_keys(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}"
