"""Helpers of benchmarks/compare.py (and learner_replica.py): settings per difficulty and algorithm, one
training run with evaluations along the way, aggregation over seeds, the markdown table and the plots."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import yaml

from rllib_treerpo.config.config_files import yaml_value

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "TreeRPO": ROOT / "configs/tiny_arith.yaml",
    "GRPO": ROOT / "configs/tiny_arith_grpo.yaml",
    "PPO": ROOT / "configs/tiny_arith_ppo.yaml",
}

# Difficulty -> env and per-algorithm overrides of the config files above. `eval_tokens` is the response
# budget of the held-out evaluation (= the training response budget: depth x step_tokens).
DIFFICULTIES = {
    "easy": {
        # the env's defaults: 3 operations on 1-9 (the cache key of make train's warm start)
        "env_config": {},
        "eval_tokens": 48,
        "TreeRPO": {},
        "GRPO": {},
        "PPO": {},
    },
    # 5 operations on operands 1-20: 6 lines (5 operations and the answer), ~53 tokens. The tree keeps its
    # shape with steps of a third of the 72-token budget; PPO steps once per line. Minibatches: ~4 steps per
    # iteration (hard batches keep fewer rows: ~250 for the tree, ~370 for GRPO).
    "hard": {
        "env_config": {"num_ops": 5, "operand_min": 1, "operand_max": 20, "seed": 0},
        "eval_tokens": 72,
        "TreeRPO": {"step_tokens": 24, "minibatch_size": 62},
        "GRPO": {"step_tokens": 72, "minibatch_size": 92},
        "PPO": {"branching": [1, 1, 1, 1, 1, 1]},
    },
    # envs/plan_arithmetic.py: the first answer line picks the short (2 operations) or the long (5) chain;
    # the warm start picks at random and solves ~30-50% (docs/compare.md, "A task built to need step credit").
    # Answers: ~25 tokens (short) to ~52 (long), at most ~63: a 66-token budget, 3 x 22-token tree steps,
    # one 66-token GRPO step, PPO one line per step (plan line, 5 operations, answer: 7 lines of <= 12).
    "plan": {
        "config": {
            "env": "treerpo/PlanArithmetic-v0",
            "warmstart": {"steps": 1200, "batch_size": 64, "lr": 0.002, "error_rate": 0.2, "demos": 20000},
        },
        "env_config": {},
        "eval_tokens": 66,
        "TreeRPO": {"step_tokens": 22},
        "GRPO": {"step_tokens": 66},
        "PPO": {"branching": [1, 1, 1, 1, 1, 1, 1]},
    },
}


def log(msg: str) -> None:
    print(msg, flush=True)


def load_settings(algorithm: str, difficulty: str, overrides: dict) -> dict:
    """Flat config of one (algorithm, difficulty): its YAML, the difficulty's overrides, then
    ``overrides``."""
    values = yaml.safe_load(CONFIGS[algorithm].read_text())
    d = DIFFICULTIES[difficulty]
    values.update({"env_config": dict(d["env_config"]), **copy.deepcopy(d.get("config", {}))})
    values.update(copy.deepcopy(d[algorithm]))
    values.update(copy.deepcopy(overrides))
    values.update({"eval_problems": 0, "checkpoint_every": 0})  # compare.py evaluates by itself
    return values


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``[ALGO:]field=value`` -> {"*" or ALGO: {field: value}} (values parsed as YAML)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected [ALGORITHM:]field=value")
        scope, _, field = key.rpartition(":")
        out.setdefault(scope or "*", {})[field.strip()] = yaml_value(value, f"--set {item!r}")
    return out


# --- models and evaluation ----------------------------------------------------------------------------
def run_config(
    algorithm: str, difficulty: str, overrides: dict, model_path: str | None = None, seed: int = 0
):
    """(TreeRPOConfig, JobConfig, sections) of one (algorithm, difficulty) with ``overrides``, a model and a
    seed."""
    from rllib_treerpo.jobs.config import load_run_config

    values = {"dtype": "float32", **load_settings(algorithm, difficulty, overrides)}  # measured in float32
    if model_path is not None:
        values.update(model_name_or_path=model_path, seed=seed)
    return load_run_config(None, values, announce=None)  # stdout: the benchmarks' JSON lines


def warm_model(difficulty: str, overrides: dict) -> str:
    """The warm-started tiny model of a difficulty (cached; shared by every algorithm and seed)."""
    from rllib_treerpo.jobs.train import use_embedded_model

    config, job, _ = run_config("TreeRPO", difficulty, overrides)
    use_embedded_model(config, job)
    return config.model_name_or_path


def env_of(difficulty: str) -> str:
    """The gymnasium id of a difficulty's env (the configs' arithmetic task unless it names one)."""
    return DIFFICULTIES[difficulty].get("config", {}).get("env", "treerpo/Arithmetic-v0")


def evaluator(
    model_path: str, env_config: dict, *, problems: int, samples: int, max_tokens: int, env: str | None = None
):
    """Held-out evaluation on the env's test split; call it with a weights dict (or None: the base model).

    Returns pass@1 (mean over K samples at T=1), greedy accuracy, response length and the samples per
    problem."""
    from envs import make_reasoning_env
    from rllib_treerpo.models.model_io import load_causal_lm
    from rllib_treerpo.sampling.evaluation import Evaluator

    evaluate = Evaluator.from_model(
        model_path,
        make_reasoning_env(env or "treerpo/Arithmetic-v0", {**env_config, "split": "test"}),
        problems=problems,
        samples=samples,
        max_new_tokens=max_tokens,
        temperature=1.0,
        seed=1234,
    )
    initial = load_causal_lm(model_path).state_dict()

    def call(weights: dict | None = None) -> dict:
        summary, _ = evaluate(initial if weights is None else weights)
        return {
            "pass@1": summary["pass@1"],
            "greedy": summary["greedy_accuracy"],
            "response_tokens": summary["mean_response_tokens"],
            "samples": samples,
        }

    return call


# --- one training run -----------------------------------------------------------------------------------
def build(algorithm: str, values: dict, model_path: str, seed: int):
    """A built RLlib algorithm and the function that turns its result into a metrics row."""
    from rllib_treerpo.jobs.config import load_run_config

    values = {
        "dtype": "float32",
        **values,
        "model_name_or_path": model_path,
        "seed": seed,
    }  # measured in fp32
    config, _, sections = load_run_config(None, values, announce=None)
    if algorithm == "PPO":
        from rllib_treerpo.baselines.ppo.job import build_ppo_config, ppo_metrics_row, ppo_settings

        return build_ppo_config(
            config, ppo_settings(config, sections.get("ppo"))
        ).build_algo(), ppo_metrics_row
    from rllib_treerpo.jobs.train import metrics_row

    return config.build_algo(), metrics_row


def tokens_and_prompts(row: dict) -> tuple[float, float]:
    """Generated tokens and new prompts of one iteration (TreeRPO/GRPO trees or PPO episodes)."""
    if "tree/generated_tokens" in row:
        return row["tree/generated_tokens"], row["tree/trees"]
    return row["perf/generated_tokens"], row["perf/prompts"]


def run(
    algorithm: str,
    values: dict,
    model_path: str,
    seed: int,
    evaluate,
    *,
    budget: float,
    num_evals: int,
    before: dict,
    evaluate_final=None,
) -> dict:
    """Train until ``budget`` generated tokens, evaluating at every budget/num_evals tokens (and at the
    end, with ``evaluate_final`` when given: the curve's points may use fewer samples than the end point).
    ``seconds`` of a point = wall-clock seconds inside ``algo.train()`` so far (evaluations excluded)."""
    from rllib_treerpo.rllib.rl_module import learner_policy_weights

    algo, to_row = build(algorithm, values, model_path, seed)
    points = [{"tokens": 0.0, "prompts": 0.0, "iteration": 0, "seconds": 0.0, **before}]
    tokens = prompts = train_seconds = 0.0
    rows, next_eval = [], budget / num_evals
    try:
        while tokens < budget:
            start = time.perf_counter()
            row = to_row(algo.train())
            train_seconds += time.perf_counter() - start
            new_tokens, new_prompts = tokens_and_prompts(row)
            tokens, prompts = tokens + new_tokens, prompts + new_prompts
            rows.append(row)
            if tokens >= next_eval or tokens >= budget:
                last = tokens >= budget and evaluate_final is not None
                point = (evaluate_final if last else evaluate)(learner_policy_weights(algo))
                points.append(
                    {
                        "tokens": tokens,
                        "prompts": prompts,
                        "iteration": len(rows),
                        "seconds": round(train_seconds, 1),
                        **point,
                    }
                )
                log(
                    f"    {algorithm:8s} seed {seed} it {len(rows):3d}  {tokens / 1e3:6.0f}k tokens  "
                    f"{prompts:6.0f} prompts  pass@1 {point['pass@1']:.3f}  greedy {point['greedy']:.3f}  "
                    f"len {point['response_tokens']:.1f}  train reward {row.get('reward/mean', 0):.3f}  "
                    f"({train_seconds:.0f}s)"
                )
                while next_eval <= tokens:
                    next_eval += budget / num_evals
    finally:
        algo.stop()
    return {
        "algorithm": algorithm,
        "seed": seed,
        "points": points,
        "train_seconds": round(train_seconds, 1),
        "metrics": rows,
    }


# --- aggregation, table, plots ---------------------------------------------------------------------------
def interpolate(points: list[dict], x_key: str, x: float, y_key: str) -> float:
    xs = np.array([p[x_key] for p in points])
    ys = np.array([p[y_key] for p in points])
    return float(np.interp(x, xs, ys))


def aggregate(runs: list[dict], equal_prompts: float, equal_seconds: float | None = None) -> dict:
    """Mean and std over seeds of the final point, and of the curve interpolated at ``equal_prompts`` and at
    ``equal_seconds`` of training (the equal-time view)."""
    finals = [r["points"][-1] for r in runs]

    def ms(values):
        return float(np.mean(values)), float(np.std(values))

    acc, greedy = ms([f["pass@1"] for f in finals]), ms([f["greedy"] for f in finals])
    at_p = ms([interpolate(r["points"], "prompts", equal_prompts, "pass@1") for r in runs])
    greedy_at_p = ms([interpolate(r["points"], "prompts", equal_prompts, "greedy") for r in runs])
    equal_seconds = equal_seconds if equal_seconds is not None else min(r["train_seconds"] for r in runs)
    at_s = ms([interpolate(r["points"], "seconds", equal_seconds, "pass@1") for r in runs])
    greedy_at_s = ms([interpolate(r["points"], "seconds", equal_seconds, "greedy") for r in runs])
    tokens = float(np.mean([f["tokens"] for f in finals]))
    prompts = float(np.mean([f["prompts"] for f in finals]))
    return {
        "accuracy_mean": acc[0],
        "accuracy_std": acc[1],
        "greedy_mean": greedy[0],
        "greedy_std": greedy[1],
        "response_tokens_mean": float(np.mean([f["response_tokens"] for f in finals])),
        "final_eval_samples": finals[0].get("samples"),
        "generated_tokens": tokens,
        "prompts": prompts,
        "tokens_per_prompt": tokens / max(prompts, 1.0),
        "iterations": float(np.mean([f["iteration"] for f in finals])),
        "wall_seconds": float(np.mean([r["train_seconds"] for r in runs])),
        "wall_seconds_std": float(np.std([r["train_seconds"] for r in runs])),
        "equal_prompts": equal_prompts,
        "accuracy_at_equal_prompts_mean": at_p[0],
        "accuracy_at_equal_prompts_std": at_p[1],
        "greedy_at_equal_prompts_mean": greedy_at_p[0],
        "equal_seconds": equal_seconds,
        "accuracy_at_equal_seconds_mean": at_s[0],
        "accuracy_at_equal_seconds_std": at_s[1],
        "greedy_at_equal_seconds_mean": greedy_at_s[0],
        "greedy_at_equal_seconds_std": greedy_at_s[1],
        "seeds": [r["seed"] for r in runs],
        "per_seed_accuracy": [f["pass@1"] for f in finals],
        "per_seed_greedy": [f["greedy"] for f in finals],
        "per_seed_train_seconds": [r["train_seconds"] for r in runs],
        **training_stats(runs),
    }


def training_stats(runs: list[dict]) -> dict:
    """Means over seeds and iterations of what explains a curve: groups dropped by tau (TreeRPO/GRPO), trees
    whose leaves all failed, optimizer steps per iteration, and the seconds of sampling and learning."""
    keys = {
        "frac_groups_filtered": "tree/frac_groups_filtered",
        "frac_trees_all_wrong": "reward/frac_trees_all_wrong",
        "optimizer_steps_per_iteration": "loss/optimizer_steps",
        "train_reward": "reward/mean",
    }
    out = {}
    for name, key in keys.items():
        values = [row[key] for r in runs for row in r.get("metrics", []) if key in row]
        if values:
            out[name] = float(np.mean(values))
    for name in ("sample_seconds", "learn_seconds"):
        totals = [sum(row.get(f"perf/{name}", 0.0) for row in r.get("metrics", [])) for r in runs]
        out[name] = float(np.mean(totals))
    return out


def markdown_table(title: str, before: dict, results: dict[str, dict]) -> str:
    """One row per algorithm: the end point at equal generated tokens, its training seconds and tokens per
    prompt, and pass@1 interpolated at equal training seconds and at equal prompts."""
    lines = [
        f"### {title}",
        "",
        "| algorithm | pass@1 (T=1) | greedy | response tokens | generated tokens | train s "
        "| tokens / prompt | prompts seen | iterations | pass@1 at equal train s | greedy at equal train s "
        "| pass@1 at equal prompts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| before RL | {before['pass@1']:.3f} | {before['greedy']:.3f} | {before['response_tokens']:.1f} "
        "| 0 | 0 | | 0 | 0 | | | |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['greedy_mean']:.3f} ± "
            f"{r['greedy_std']:.3f} | {r['response_tokens_mean']:.1f} | {r['generated_tokens'] / 1e3:.0f}k | "
            f"{r['wall_seconds']:.0f} ± {r['wall_seconds_std']:.0f} | {r['tokens_per_prompt']:.0f} | "
            f"{r['prompts']:.0f} | {r['iterations']:.1f} | "
            f"{r['accuracy_at_equal_seconds_mean']:.3f} ± {r['accuracy_at_equal_seconds_std']:.3f} "
            f"(@{r['equal_seconds']:.0f} s) | {r['greedy_at_equal_seconds_mean']:.3f} ± "
            f"{r['greedy_at_equal_seconds_std']:.3f} | "
            f"{r['accuracy_at_equal_prompts_mean']:.3f} ± {r['accuracy_at_equal_prompts_std']:.3f} "
            f"(@{r['equal_prompts']:.0f}) |"
        )
    return "\n".join(lines) + "\n"


X_AXES = {
    "tokens": "generated tokens",
    "seconds": "training wall-clock seconds",
    "prompts": "training prompts seen",
}


def plot_curves(runs_by_algo: dict[str, list[dict]], title: str, path: Path) -> None:
    """pass@1 and greedy accuracy against generated tokens, training seconds and prompts; mean over seeds,
    min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for name, runs in runs_by_algo.items():
        n = min(len(r["points"]) for r in runs)
        for row, y_key in enumerate(("pass@1", "greedy")):
            ys = np.array([[p[y_key] for p in r["points"][:n]] for r in runs])
            for col, x_key in enumerate(X_AXES):
                xs = np.mean([[p[x_key] for p in r["points"][:n]] for r in runs], axis=0)
                ax = axes[row, col]
                (line,) = ax.plot(xs, ys.mean(0), marker=".", label=name)
                ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
                ax.set_xlabel(X_AXES[x_key])
                ax.set_ylabel(f"held-out {y_key}" + (" (T=1)" if y_key == "pass@1" else ""))
                ax.grid(alpha=0.3)
                if x_key in ("prompts", "seconds"):
                    ax.set_xscale("symlog", linthresh=32 if x_key == "prompts" else 10)
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.rename(path)
