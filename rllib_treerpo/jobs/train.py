"""The main job behind `treerpo train`: model -> held-out eval -> iterations (evaluated along the way) ->
eval.

Output folder (jobs/run_folder.py): config.yaml          the resolved config (algorithm and job fields), also
  what --resume reads metrics.jsonl        one row per iteration (tree/*, reward/*, loss/*, perf/*,
  completions/*; eval/* when the policy was evaluated then, iteration 0 = before training) tb/
  the same rows as TensorBoard scalars (`tensorboard --logdir runs`) eval_before.json / eval_after.json /
  eval_*.jsonl   held-out summaries and per-problem rows learning_curve.png   held-out pass@1 and greedy
  accuracy along training, train reward, filtered groups, ... trees/iter_N.json    a few sampled trees per
  iteration with values and advantages (`treerpo show RUN`) checkpoints/iter_NNNNNN, checkpoints/latest
  RLlib checkpoints (weights, optimizer, counters) final_model/         the trained policy as a Hugging Face
  folder (from_pretrained-able), with its run's settings summary.json         before/after accuracy, seconds,
  generated tokens
"""

from __future__ import annotations

import gc
import json
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rllib_treerpo.jobs.config import JobConfig, flat_config
from rllib_treerpo.jobs.monitor import HeldOut, Monitor
from rllib_treerpo.jobs.run_folder import RunFolder
from rllib_treerpo.learner.memory import trim_heap
from rllib_treerpo.models.warmstart import copy_record
from rllib_treerpo.rllib.config import TreeRPOConfig


class Interrupted(Exception):
    """Ctrl-C: the message says where the run can be resumed from (the CLI prints it as one line)."""


class LearnerLost(Exception):
    """An actor the driver cannot do without (a learner: num_learners >= 1) died mid-run, e.g. with its node:
    the message says where the run can be resumed from (the CLI prints it as one line). Env runners lost are
    not this: their shares are grown again on the others (rllib/shares.py)."""


def log(msg: str) -> None:
    print(msg, flush=True)


# --- model and evaluation ------------------------------------------------------------------------------
def use_embedded_model(config: TreeRPOConfig, job: JobConfig) -> None:
    """``model_name_or_path: null`` -> the embedded model (built with the job's tiny_model/warmstart,
    cached)."""
    from rllib_treerpo.models.warmstart import embedded_model

    if config.model_name_or_path is None:
        config.model_name_or_path = embedded_model(
            config.env, config.env_config, job.tiny_model, job.warmstart, log=log
        )


def write_eval(folder: RunFolder, name: str, summary: dict, rows: list[dict], seconds: float) -> dict:
    """eval_<name>.json and eval_<name>.jsonl, and the log line."""
    from rllib_treerpo.jobs.run_folder import finite, write_json

    summary = {**summary, "seconds": round(seconds, 2)}
    write_json(folder.path / f"eval_{name}.json", summary)
    with open(folder.path / f"eval_{name}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(finite(row)) + "\n")
    log(
        f"eval {name}: pass@1 {summary['pass@1']:.3f}  "
        f"greedy {summary.get('greedy_accuracy', float('nan')):.3f}"
        f"  mean response tokens {summary['mean_response_tokens']:.1f}  ({summary['seconds']:.0f}s, "
        f"{summary['problems']} held-out problems x {summary['samples']} samples)"
    )
    return summary


# --- metrics ------------------------------------------------------------------------------------------
def _flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + "/")
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):  # numpy scalars included
            yield key, float(v)


def metrics_row(result: dict) -> dict:
    """The stable metric names of one iteration from an RLlib result dict."""
    flat = dict(_flatten(result))
    row = {"iteration": int(result["training_iteration"])}
    for key, value in flat.items():
        head = key.split("/")[0]
        if head in ("tree", "reward", "completions", "perf", "loss"):
            row[key] = value
        elif key.startswith("learners/default_policy/loss/"):
            row[key.removeprefix("learners/default_policy/")] = value
        elif key == "learners/default_policy/gradients_default_optimizer_global_norm":
            row["loss/grad_norm"] = value
        elif key.startswith("timers/"):
            row["perf/" + key.removeprefix("timers/").lower()] = value
    if row.get("loss/optimizer_steps") == 0:  # no update this iteration: the learners' last values are stale
        row = {k: v for k, v in row.items() if not k.startswith("loss/") or k == "loss/optimizer_steps"}
    return row


# --- the job ------------------------------------------------------------------------------------------
@dataclass
class JobParts:
    """What differs between the algorithms `treerpo train` runs; the job loop itself is shared.

    preflight: () -> None, every check that can fail before a warm start, a model load or Ray (one line naming
    the field); build_algo: () -> a built RLlib Algorithm; metrics_row: result dict -> metrics.jsonl row;
    progress: row -> the algorithm-specific middle of the progress line; resolved: () -> config.yaml's content
    (once the model is resolved); totals: summary key -> metrics key summed over iterations; label:
    summary["algorithm"]; evaluate: (algo, result or None) -> the held-out summary along training, when the
    algorithm evaluates itself (None: the job's HeldOut on the learners' weights).
    """

    preflight: Callable[[], None]
    build_algo: Callable[[], Any]
    metrics_row: Callable[[dict], dict]
    progress: Callable[[dict], str]
    resolved: Callable[[], dict]
    totals: dict[str, str] = field(default_factory=dict)
    label: str = "TreeRPO"
    evaluate: Callable[[Any, dict | None], dict] | None = None


def _rate(per_second: float) -> str:
    return f"{per_second / 1e3:.1f}k" if per_second >= 1000 else f"{per_second:.0f}"


def treerpo_parts(config: TreeRPOConfig, job: JobConfig) -> JobParts:
    def progress(row: dict) -> str:
        line = (
            f"reward {row.get('reward/mean', 0):.3f}  "
            f"filtered {row.get('tree/frac_groups_filtered', 0):.2f}  "
            f"len {row.get('completions/mean_length', 0):.1f}  "
            f"steps {row.get('loss/optimizer_steps') or 0:.0f}  "
            f"{_rate(row.get('perf/decode_tokens_per_s', 0))} tok/s"
        )
        if not row.get("loss/optimizer_steps"):  # nothing trained: say why, loudly
            why = (
                "every sibling group was filtered (equal values, std < tau)"
                if row.get("tree/train_tokens", 0) == 0
                else "no update"
            )
            line += f"  WARNING: no training step ({why}; reward {row.get('reward/mean', 0):.2f})"
        elif row.get("reward/std") == 0:  # trained, but every advantage is 0 (tau 0 keeps equal groups)
            line += f"  WARNING: every leaf reward was {row.get('reward/mean', 0):.2f}: no learning signal"
        if config.max_staleness:  # who waited for whom, and how old the trained trees were
            waits = (row.get("perf/learner_wait_seconds", 0), row.get("perf/sampler_wait_seconds", 0))
            line += f"  waited: learner {waits[0]:.1f}s runners {waits[1]:.1f}s"
            line += f"  stale {row.get('perf/staleness_mean', 0):.1f}"
        if row.get("perf/dropped_stale_trees"):
            dropped = row["perf/dropped_stale_trees"]
            line += f"  dropped {dropped:.0f} trees older than max_staleness (grown again)"
        if row.get("perf/env_runner_failures") or row.get("perf/env_runner_restarts"):
            line += (
                f"  env runner lost {row.get('perf/env_runner_failures', 0):.0f}, restarted "
                f"{row.get('perf/env_runner_restarts', 0):.0f}, "
                f"trees re-grown {row.get('perf/resampled_trees', 0):.0f}"
            )
        return line

    def evaluate(algo, result: dict | None) -> dict:
        """The Algorithm's evaluation (RLlib's evaluation_interval = eval_every: rllib/evaluation.py): the
        iteration's results carry it when it was due; otherwise (iteration 0, the last iteration) it runs
        now."""
        carried = (result or {}).get("evaluation")
        if carried and carried.get("iteration") == algo.iteration:
            return carried
        return algo.evaluate()

    return JobParts(
        preflight=lambda: config.preflight(job.eval_env_config, job.tiny_model),
        build_algo=config.build_algo,
        metrics_row=metrics_row,
        progress=progress,
        resolved=lambda: flat_config(config, job),
        totals={
            "generated_tokens": "tree/generated_tokens",
            "env_runner_failures": "perf/env_runner_failures",
            "env_runner_restarts": "perf/env_runner_restarts",
            "resampled_trees": "perf/resampled_trees",
            "dropped_stale_trees": "perf/dropped_stale_trees",
        },
        evaluate=evaluate if config.evaluation_interval else None,
    )


def train(
    config: TreeRPOConfig,
    job: JobConfig,
    output: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    parts: Callable[[TreeRPOConfig, JobConfig], JobParts] = treerpo_parts,
) -> dict:
    """Run (or resume) the job; returns summary.json's content. ``parts`` picks the algorithm (default
    TreeRPO; :func:`rllib_treerpo.baselines.ppo.job.ppo_parts` for RLlib's PPO). Every check that can fail
    runs before the warm start, the model load and Ray; Ctrl-C raises :class:`Interrupted` naming where to
    resume."""
    folder = RunFolder(output)
    folder.check_resume() if resume else folder.check_new(overwrite)
    pieces = parts(config, job)
    pieces.preflight()
    job_start = time.perf_counter()
    algo = None
    try:
        use_embedded_model(config, job)
        resolved = pieces.resolved()
        folder.path.mkdir(parents=True, exist_ok=True)
        (folder.path / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        copy_record(config.model_name_or_path, folder.path)  # how the warm start was built, if recorded
        summary = folder.summary() if resume else {}
        summary["algorithm"] = pieces.label
        held_out = HeldOut(config, job, job.eval_problems) if job.eval_problems else None
        if held_out is not None and "eval_before" not in summary:
            start = time.perf_counter()
            summary["eval_before"] = write_eval(folder, "before", *held_out(), time.perf_counter() - start)
            folder.write_summary(summary)
        monitor = Monitor(folder.path, job, held_out, pieces.evaluate)
        algo = _start(pieces, folder, resume, monitor)
        _iterate(algo, pieces, job, folder, monitor)
        weights = _export(algo, config, resolved, folder)
        algo = None  # the learner's optimizer state and the sampler's copy go before the last evaluation
        gc.collect()
        trim_heap()
        _finish(weights, job, pieces, folder, summary, held_out)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(folder, algo)) from None
    except Exception as e:
        from ray.exceptions import RayActorError

        if not isinstance(e, RayActorError):
            raise
        lost = _learner_lost(folder, algo, e)
        _stop_quietly(algo)
        algo = None  # stopped already
        raise LearnerLost(lost) from None
    finally:
        if algo is not None:
            algo.stop()
    summary = folder.summary()
    summary["job_seconds_this_run"] = round(time.perf_counter() - job_start, 1)
    folder.write_summary(summary)
    log(f"done: {folder.path}")
    return summary


def _interrupted(folder: RunFolder, algo) -> str:
    checkpoint = folder.latest_checkpoint()
    at = f" at iteration {algo.iteration}" if algo is not None else ""
    if checkpoint is None:
        return (
            f"interrupted{at}, before the first checkpoint: start again with --overwrite "
            f"--output {folder.path}"
        )
    return (
        f"interrupted{at}: continue from {checkpoint.name} with `treerpo train --resume {folder.path}` (the "
        "iterations after it are redone)"
    )


def _learner_lost(folder: RunFolder, algo, error: Exception) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    at = f" in iteration {algo.iteration + 1}" if algo is not None else ""
    checkpoint = folder.latest_checkpoint()
    how = (
        f"continue from {checkpoint.name} with `treerpo train --resume {folder.path}` once the cluster has a "
        "node for it again (the iterations after it are redone)"
        if checkpoint is not None
        else f"no checkpoint yet: start again with --overwrite --output {folder.path}"
    )
    return f"a learner died{at} (its node was probably lost: {type(error).__name__}: {first}); {how}"


def _stop_quietly(algo) -> None:
    """Stop what is left of the algorithm after a lost actor (its own shutdown may fail on the dead one)."""
    if algo is not None:
        try:
            algo.stop()
        except Exception as e:  # the run is lost already; the message says how to resume
            log(f"(stopping the algorithm after the loss: {type(e).__name__}: {e})")


def _start(pieces: JobParts, folder: RunFolder, resume: bool, monitor: Monitor):
    """Ray up, the algorithm built and (with ``resume``) restored; metrics rows past the checkpoint dropped;
    the evaluation of iteration 0 when due."""
    from rllib_treerpo.jobs.ray_session import start_ray

    start_ray(log_to_driver=True)
    algo = pieces.build_algo()
    if resume:
        path = folder.check_resume()
        algo.restore_from_path(str(path))
        log(f"resumed from {path} at iteration {algo.iteration}")
    folder.truncate(algo.iteration)
    if algo.iteration == 0 and monitor.due(0):
        row = {"iteration": 0, **monitor.evaluate(algo)}  # the start of the held-out curve
        folder.append(row)
        monitor.record(row)
    return algo


def _iterate(algo, pieces: JobParts, job: JobConfig, folder: RunFolder, monitor: Monitor) -> None:
    """Train to ``job.iterations``: a metrics row (with the held-out evaluation when due), a checkpoint when
    due, saved trees, a progress line and the plot each."""
    from rllib_treerpo.jobs.plots import plot_learning_curve
    from rllib_treerpo.jobs.trees import save_trees

    times, walls, last_row = [], [], time.perf_counter()
    while algo.iteration < job.iterations:
        t0 = time.perf_counter()
        result = algo.train()
        it = algo.iteration
        row = pieces.metrics_row(result)
        if monitor.due(it):
            row.update(monitor.evaluate(algo, result))
        times.append(time.perf_counter() - t0)
        row["time_s"] = round(times[-1], 3)  # training (and evaluation when due)
        # the whole loop since the previous row: also the saving and the plot, which the runners (sampling
        # ahead: max_staleness) overlap with too
        walls.append(time.perf_counter() - last_row)
        last_row = time.perf_counter()
        row["wall_s"] = round(walls[-1], 3)
        folder.append(row)
        monitor.record(row)
        if job.save_trees and getattr(algo, "last_trees", None):
            save_trees(folder.path / "trees", it, algo.last_trees[: job.save_trees], algo.config)
        if (job.checkpoint_every and it % job.checkpoint_every == 0) or it == job.iterations:
            folder.save_checkpoint(algo, it)
        eta = (job.iterations - it) * sum(walls[-5:]) / len(walls[-5:])
        log(
            f"iter {it:3d}/{job.iterations}  {pieces.progress(row)}{monitor.progress()}  "
            f"{times[-1]:.1f}s/it  ETA {eta / 60:.1f} min"
        )
        plot_learning_curve(folder.metrics, folder.path / "learning_curve.png")


def _export(algo, config: TreeRPOConfig, resolved: dict, folder: RunFolder) -> dict:
    """final_model/ (with its run's settings); the algorithm stopped. Returns the policy's weights."""
    from rllib_treerpo.models.model_io import RUN_CONFIG, save_hf_folder
    from rllib_treerpo.rllib.rl_module import learner_policy_weights

    final = folder.path / "final_model"
    weights = learner_policy_weights(algo)
    save_hf_folder(config.model_name_or_path, weights, final, config.dtype)
    (final / RUN_CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))
    algo.stop()
    return weights


def _finish(
    weights: dict,
    job: JobConfig,
    pieces: JobParts,
    folder: RunFolder,
    summary: dict,
    held_out: HeldOut | None,
) -> None:
    """The held-out evaluation of the final weights, the summary and the plot."""
    from rllib_treerpo.jobs.plots import plot_learning_curve

    for key, metric in pieces.totals.items():
        summary[key] = folder.total(metric)
    if held_out is not None:
        start = time.perf_counter()
        summary["eval_after"] = write_eval(folder, "after", *held_out(weights), time.perf_counter() - start)
    summary["iterations"] = job.iterations
    folder.write_summary(summary)
    plot_learning_curve(folder.metrics, folder.path / "learning_curve.png")
