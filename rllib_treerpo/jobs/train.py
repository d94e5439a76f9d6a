"""The main job behind `treerpo train`: model -> held-out eval -> TreeRPO iterations -> held-out eval.

Output folder:
  config.yaml          the resolved config (fields of TreeRPOConfig), also what --resume reads
  metrics.jsonl        one row per iteration (tree/*, reward/*, loss/*, perf/*, completions/*)
  eval_before.json / eval_after.json / eval_*.jsonl   held-out summaries and per-problem rows
  learning_curve.png   reward, accuracy, filtered groups and loss against iterations
  checkpoints/iter_NNNNNN, checkpoints/latest   RLlib checkpoints (weights, optimizer, counters)
  final_model/         the trained policy as a Hugging Face folder (from_pretrained-able)
  summary.json         before/after accuracy, seconds, generated tokens
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rllib_treerpo.jobs.config import JobConfig, flat_config
from rllib_treerpo.rllib.algorithm import TreeRPOConfig


def log(msg: str) -> None:
    print(msg, flush=True)


# --- model and evaluation ------------------------------------------------------------------------------
def resolve_model(config: TreeRPOConfig, job: JobConfig) -> None:
    """``model_name_or_path: null`` -> the embedded model (built with the job's tiny_model/warmstart, cached)."""
    from rllib_treerpo.warmstart import embedded_model

    if config.model_name_or_path is None:
        config.model_name_or_path = embedded_model(
            config.env, config.env_config, job.tiny_model, job.warmstart, log=log
        )


def run_eval(config: TreeRPOConfig, job: JobConfig, model_path: str, out: Path, name: str) -> dict:
    """Held-out evaluation of a Hugging Face folder; writes eval_<name>.json and eval_<name>.jsonl."""
    from envs import make_reasoning_env
    from rllib_treerpo.evaluation import Evaluator

    env = make_reasoning_env(config.env, {**config.env_config, **job.eval_env_config})
    evaluator = Evaluator.from_model(
        model_path,
        env,
        dtype=config.dtype,
        backend=config.backend,
        chat_template=config.chat_template,
        system_prompt=config.system_prompt,
        problems=job.eval_problems,
        samples=job.eval_samples,
        max_new_tokens=config.tree_spec().response_tokens,
        temperature=config.temperature,
        seed=config.seed or 0,
        backend_kwargs=config.backend_kwargs(),
    )
    start = time.perf_counter()
    summary, rows = evaluator()
    evaluator.backend.release()  # e.g. a sleeping vLLM engine leaves the GPU to the training run
    summary["seconds"] = round(time.perf_counter() - start, 2)
    (out / f"eval_{name}.json").write_text(json.dumps(summary, indent=2))
    with open(out / f"eval_{name}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    log(
        f"eval {name}: pass@1 {summary['pass@1']:.3f}  greedy {summary.get('greedy_accuracy', float('nan')):.3f}"
        f"  mean response tokens {summary['mean_response_tokens']:.1f}  ({summary['seconds']:.0f}s, "
        f"{summary['problems']} held-out problems)"
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
    return row


# --- the job ------------------------------------------------------------------------------------------
@dataclass
class JobParts:
    """What differs between the algorithms `treerpo train` runs; the job loop itself is shared.

    build_algo: () -> a built RLlib Algorithm; metrics_row: result dict -> metrics.jsonl row; progress: row ->
    the algorithm-specific middle of the progress line; resolved: config.yaml's content; totals: summary key ->
    metrics key summed over iterations; label: summary["algorithm"].
    """

    build_algo: Callable[[], Any]
    metrics_row: Callable[[dict], dict]
    progress: Callable[[dict], str]
    resolved: dict
    totals: dict[str, str] = field(default_factory=dict)
    label: str = "TreeRPO"


def treerpo_parts(config: TreeRPOConfig, job: JobConfig) -> JobParts:
    def progress(row: dict) -> str:
        return (
            f"reward {row.get('reward/mean', 0):.3f}  acc {row.get('reward/accuracy', 0):.3f}  "
            f"filtered {row.get('tree/frac_groups_filtered', 0):.2f}  "
            f"len {row.get('completions/mean_length', 0):.1f}  "
            f"steps {row.get('loss/optimizer_steps', 0):.0f}  "
            f"{row.get('perf/decode_tokens_per_s', 0) / 1e3:.1f}k tok/s"
        )

    return JobParts(
        build_algo=config.build_algo,
        metrics_row=metrics_row,
        progress=progress,
        resolved=flat_config(config, job),
        totals={"generated_tokens": "tree/generated_tokens"},
    )


def train(
    config: TreeRPOConfig,
    job: JobConfig,
    output: str | Path,
    *,
    resume: bool = False,
    parts: Callable[[TreeRPOConfig, JobConfig], JobParts] = treerpo_parts,
) -> dict:
    """Run (or resume) the job; returns summary.json's content. ``parts`` picks the algorithm (default
    TreeRPO; :func:`rllib_treerpo.baselines.ppo.job.ppo_parts` for RLlib's PPO)."""
    config.check_backend_installed()  # e.g. backend vllm without vllm: one line, before any model or Ray
    out = Path(output).resolve()  # RLlib checkpoints need absolute paths ("URI has empty scheme")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    job_start = time.perf_counter()
    resolve_model(config, job)
    config.validate_fields()
    pieces = parts(config, job)
    (out / "config.yaml").write_text(yaml.safe_dump(pieces.resolved, sort_keys=False))

    summary = (
        json.loads((out / "summary.json").read_text()) if resume and (out / "summary.json").exists() else {}
    )
    summary["algorithm"] = pieces.label
    if job.eval_problems and "eval_before" not in summary:
        summary["eval_before"] = run_eval(config, job, config.model_name_or_path, out, "before")
        _write_json(out / "summary.json", summary)

    algo = _start(pieces, out, resume)
    _iterate(algo, pieces, job, out)
    final = out / "final_model"
    from rllib_treerpo.model_io import save_hf_folder
    from rllib_treerpo.rllib.rl_module import learner_policy_weights

    save_hf_folder(config.model_name_or_path, learner_policy_weights(algo), final, config.dtype)
    algo.stop()
    for key, metric in pieces.totals.items():
        summary[key] = _sum_metric(out / "metrics.jsonl", metric)
    if job.eval_problems:
        summary["eval_after"] = run_eval(config, job, str(final), out, "after")
    summary["iterations"] = job.iterations
    summary["job_seconds_this_run"] = round(time.perf_counter() - job_start, 1)
    _write_json(out / "summary.json", summary)
    from rllib_treerpo.jobs.plots import plot_learning_curve

    plot_learning_curve(out / "metrics.jsonl", out / "learning_curve.png")
    log(f"done: {out}")
    return summary


def _start(pieces: JobParts, out: Path, resume: bool):
    """Ray up, the algorithm built and (with ``resume``) restored from ``checkpoints/latest``."""
    import ray

    if not ray.is_initialized():
        ray.init(
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=True,
            num_cpus=max(2, os.cpu_count() or 2),
        )
    algo = pieces.build_algo()
    latest = out / "checkpoints" / "latest"
    if resume and latest.exists():
        path = latest.parent / latest.read_text().strip()
        algo.restore_from_path(str(path))
        log(f"resumed from {path} at iteration {algo.iteration}")
    _truncate_metrics(out / "metrics.jsonl", algo.iteration)
    return algo


def _iterate(algo, pieces: JobParts, job: JobConfig, out: Path) -> None:
    """Train to ``job.iterations``: a metrics row, a checkpoint when due, a progress line and the plot each."""
    from rllib_treerpo.jobs.plots import plot_learning_curve

    times = []
    while algo.iteration < job.iterations:
        t0 = time.perf_counter()
        result = algo.train()
        times.append(time.perf_counter() - t0)
        row = pieces.metrics_row(result)
        row["time_s"] = round(times[-1], 3)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        it = algo.iteration
        if (job.checkpoint_every and it % job.checkpoint_every == 0) or it == job.iterations:
            _save_checkpoint(algo, out / "checkpoints", it)
        eta = (job.iterations - it) * sum(times[-5:]) / len(times[-5:])
        log(
            f"iter {it:3d}/{job.iterations}  {pieces.progress(row)}  {times[-1]:.1f}s/it  ETA {eta / 60:.1f} min"
        )
        plot_learning_curve(out / "metrics.jsonl", out / "learning_curve.png")


def _save_checkpoint(algo, ckpt_dir: Path, iteration: int) -> None:
    """Save, then point `latest` at it (atomic rename): an interrupted save never becomes `latest`."""
    name = f"iter_{iteration:06d}"
    algo.save_to_path(str(ckpt_dir / name))
    tmp = ckpt_dir / "latest.tmp"
    tmp.write_text(name)
    tmp.rename(ckpt_dir / "latest")
    for old in sorted(ckpt_dir.glob("iter_*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop rows past the restored iteration (they belong to the iteration(s) lost in the interruption)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if json.loads(r)["iteration"] <= iteration]
    path.write_text("".join(r + "\n" for r in keep))


def _sum_metric(path: Path, key: str) -> float:
    if not path.exists():
        return 0.0
    return sum(json.loads(line).get(key, 0.0) for line in path.read_text().splitlines() if line.strip())


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.rename(path)
