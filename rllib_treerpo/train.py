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

import hashlib
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

from rllib_treerpo.config import TreeRPOConfig

CACHE_DIR = Path(os.environ.get("TREERPO_CACHE", Path.home() / ".cache" / "rllib_treerpo"))


def log(msg: str) -> None:
    print(msg, flush=True)


# --- model preparation ------------------------------------------------------------------------------
def prepare_tiny_model(config: TreeRPOConfig) -> str:
    """Build the tiny char-level model and warm-start it on the env's demonstrations; cached by settings."""
    import torch

    from rllib_treerpo.env_runner import make_reasoning_env
    from rllib_treerpo.tiny import build_char_tokenizer, build_tiny_model
    from rllib_treerpo.warmstart import sft

    ws = {"steps": 1500, "batch_size": 128, "lr": 2e-3, "error_rate": 0.2, "demos": 20000, "seed": 0,
          **config.warmstart}
    key = json.dumps({"tiny": config.tiny_model, "warmstart": ws, "env": str(config.env),
                      "env_config": config.env_config, "v": 1}, sort_keys=True, default=str)
    folder = CACHE_DIR / f"warmstart-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "config.json").exists():
        log(f"warm start: cached model {folder}")
        return str(folder)
    env = make_reasoning_env(config.env, config.env_config)
    if not hasattr(env, "demonstrations"):
        raise ValueError(f"config field 'model_name_or_path' is null, but env {config.env!r} has no "
                         "demonstrations() to warm-start the tiny model: give a model_name_or_path")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=ws["seed"], eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **config.tiny_model)
    demos = env.demonstrations(ws["demos"], seed=ws["seed"], error_rate=ws["error_rate"])
    log(f"warm start: SFT of a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter model on "
        f"{len(demos)} demonstrations ({ws['error_rate']:.0%} step errors), {ws['steps']} steps")
    torch.manual_seed(ws["seed"])
    start = time.perf_counter()
    sft(model, tokenizer, demos, steps=ws["steps"], batch_size=ws["batch_size"], lr=ws["lr"], seed=ws["seed"],
        progress=lambda s, loss: log(f"  sft step {s + 1}/{ws['steps']} loss {loss:.3f} "
                                     f"({time.perf_counter() - start:.0f}s)"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # atomic: a half-written cache is never picked up
    return str(folder)


# --- evaluation ---------------------------------------------------------------------------------------
def run_eval(config: TreeRPOConfig, model_path: str, out: Path, name: str) -> dict:
    """Held-out evaluation of a Hugging Face folder; writes eval_<name>.json and eval_<name>.jsonl."""
    from transformers import AutoTokenizer

    from rllib_treerpo.env_runner import make_reasoning_env
    from rllib_treerpo.evaluate import evaluate
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.prompts import prompt_tokenizer
    from rllib_treerpo.rl_module import load_causal_lm

    env = make_reasoning_env(config.env, {**config.env_config, **config.eval_env_config})
    model = load_causal_lm(model_path, config.dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    backend = make_backend(config.backend, model, tokenizer)
    start = time.perf_counter()
    summary, rows = evaluate(
        env, backend, prompt_tokenizer(tokenizer, chat_template=config.chat_template,
                                       system_prompt=config.system_prompt), num_problems=config.eval_problems, samples=config.eval_samples,
        max_new_tokens=config.step_tokens * len(config.branching), temperature=config.temperature,
        seed=config.seed or 0)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    (out / f"eval_{name}.json").write_text(json.dumps(summary, indent=2))
    with open(out / f"eval_{name}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    log(f"eval {name}: pass@1 {summary['pass@1']:.3f}  greedy {summary.get('greedy_accuracy', float('nan')):.3f}"
        f"  mean response tokens {summary['mean_response_tokens']:.1f}  ({summary['seconds']:.0f}s, "
        f"{summary['problems']} held-out problems)")
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
        if head in ("tree", "reward", "completions", "perf"):
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


def treerpo_parts(config: TreeRPOConfig) -> JobParts:
    def progress(row: dict) -> str:
        return (f"reward {row.get('reward/mean', 0):.3f}  acc {row.get('reward/accuracy', 0):.3f}  "
                f"filtered {row.get('tree/frac_groups_filtered', 0):.2f}  "
                f"len {row.get('completions/mean_length', 0):.1f}  "
                f"steps {row.get('loss/optimizer_steps', 0):.0f}  "
                f"{row.get('perf/decode_tokens_per_s', 0) / 1e3:.1f}k tok/s")

    return JobParts(build_algo=config.build_algo, metrics_row=metrics_row, progress=progress,
                    resolved=config.to_flat_dict(), totals={"generated_tokens": "tree/generated_tokens"})


def train(config: TreeRPOConfig, output: str | Path, *, resume: bool = False,
          parts: Callable[[TreeRPOConfig], JobParts] = treerpo_parts) -> dict:
    """Run (or resume) the job; returns summary.json's content. ``parts`` picks the algorithm (default
    TreeRPO; :func:`rllib_treerpo.ppo.ppo_parts` for RLlib's PPO)."""
    import ray

    from rllib_treerpo.plots import plot_learning_curve

    out = Path(output).resolve()  # RLlib checkpoints need absolute paths ("URI has empty scheme")
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    job_start = time.perf_counter()
    if config.model_name_or_path is None:
        config.model_name_or_path = prepare_tiny_model(config)
    config.validate_fields()
    job = parts(config)
    (out / "config.yaml").write_text(yaml.safe_dump(job.resolved, sort_keys=False))

    summary = json.loads((out / "summary.json").read_text()) if resume and (out / "summary.json").exists() else {}
    summary["algorithm"] = job.label
    if config.eval_problems and "eval_before" not in summary:
        summary["eval_before"] = run_eval(config, config.model_name_or_path, out, "before")
        _write_json(out / "summary.json", summary)

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=True,
                 num_cpus=max(2, os.cpu_count() or 2))
    algo = job.build_algo()
    latest = ckpt_dir / "latest"
    if resume and latest.exists():
        path = ckpt_dir / latest.read_text().strip()
        algo.restore_from_path(str(path))
        log(f"resumed from {path} at iteration {algo.iteration}")
    _truncate_metrics(out / "metrics.jsonl", algo.iteration)

    times = []
    while algo.iteration < config.iterations:
        t0 = time.perf_counter()
        result = algo.train()
        times.append(time.perf_counter() - t0)
        row = job.metrics_row(result)
        row["time_s"] = round(times[-1], 3)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        it = algo.iteration
        if (config.checkpoint_every and it % config.checkpoint_every == 0) or it == config.iterations:
            _save_checkpoint(algo, ckpt_dir, it)
        eta = (config.iterations - it) * sum(times[-5:]) / len(times[-5:])
        log(f"iter {it:3d}/{config.iterations}  {job.progress(row)}  {times[-1]:.1f}s/it  ETA {eta / 60:.1f} min")
        plot_learning_curve(out / "metrics.jsonl", out / "learning_curve.png")

    final = out / "final_model"
    export_model(algo, config.model_name_or_path, final, config.dtype)
    algo.stop()
    for key, metric in job.totals.items():
        summary[key] = _sum_metric(out / "metrics.jsonl", metric)
    if config.eval_problems:
        summary["eval_after"] = run_eval(config, str(final), out, "after")
    summary["iterations"] = config.iterations
    summary["job_seconds_this_run"] = round(time.perf_counter() - job_start, 1)
    _write_json(out / "summary.json", summary)
    plot_learning_curve(out / "metrics.jsonl", out / "learning_curve.png")
    log(f"done: {out}")
    return summary


def policy_weights(algo) -> dict:
    """The learner's LM weights under Hugging Face names (module keys ``model.*``; a PPO value head is left out)."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    state = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}")
    weights = state[COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]
    return {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}


def export_model(algo, base_model: str, folder: Path, dtype: str = "float32") -> None:
    """Write the learner's current policy as a Hugging Face folder (weights + tokenizer of the base)."""
    from transformers import AutoTokenizer

    from rllib_treerpo.rl_module import load_causal_lm

    model = load_causal_lm(base_model, dtype)
    model.load_state_dict(policy_weights(algo))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(folder)


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
