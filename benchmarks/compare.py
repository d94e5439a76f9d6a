"""The head-to-head (GitHub issue #5): TreeRPO vs GRPO vs RLlib's PPO on the arithmetic task.

Every algorithm starts from the same warm-started tiny model (one per difficulty, cached), trains on the same
problem family (the env's train split) for the same number of GENERATED tokens, and is evaluated on the same
held-out problems (the test split) along the way: pass@1 at temperature 1 (mean over K samples per problem),
greedy accuracy and mean response length. Curves are reported against generated tokens (equal compute),
training wall-clock seconds (equal time) and training prompts seen (equal data; the table interpolates each
curve at the fewest seconds and prompts any algorithm reached). Algorithms: TreeRPO = configs/tiny_arith.yaml,
GRPO = configs/tiny_arith_grpo.yaml (TreeRPO with branching [16]), PPO = configs/tiny_arith_ppo.yaml (stock
ray.rllib PPO); per-difficulty changes in benchmarks/compare_lib.py. Difficulties: easy = 3 operations on 1-9
(the default task), hard = 5 operations on 1-20 (the warm start solves about 7% when sampling), plan =
envs/plan_arithmetic.py (the first answer line picks a 2- or a 5-operation chain: docs/compare.md).

  .venv/bin/python -m benchmarks.compare            # 2 difficulties x 3 algorithms x 3 seeds, 300k tokens
  .venv/bin/python -m benchmarks.compare --quick    # easy only, 1 seed, 50k tokens: a few minutes
  .venv/bin/python -m benchmarks.compare --ablate   # TreeRPO ablations: depth, branching, tau, std, KL

Options: --budget TOKENS, --seeds N, --difficulties easy,hard, --algorithms TreeRPO,GRPO,PPO, --evals N,
--eval-problems N, --eval-samples K (before RL and the end point), --curve-samples K (the curve's other
points), --model PATH (skip the warm start), --set [ALGORITHM:]field=value, --output DIR (default runs/compare
or runs/ablate), --resume (reuse finished runs from DIR/runs.jsonl; a run is stored when it finishes).
Writes results.md, results.json ({difficulty: {algorithm: {accuracy_mean, accuracy_std, greedy_mean, ...,
response_tokens_mean, generated_tokens, prompts, tokens_per_prompt, wall_seconds,
accuracy_at_equal_seconds_mean, ...}}, settings: {...}}), curves_<difficulty>.png (accuracy against generated
tokens, training seconds and prompts), runs.jsonl, and prints one JSON line last. Training seconds are
wall-clock seconds inside algo.train() in this process: OMP_NUM_THREADS fixes torch's threads (recorded).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

from benchmarks import compare_lib as lib
from rllib_treerpo.learner.precision import hardware_keys

# name -> TreeRPO overrides (easy task); "base" is configs/tiny_arith.yaml. minibatch_size keeps about 4
# optimizer steps per iteration (a quarter of the rows a batch of that tree shape has).
ABLATIONS = {
    "base [4,4,4] x 16-token cuts, tau 0.1, group std, lr 3e-5, minibatches of 100": {},
    "one line per step [3,3,3,3] (12-token lines)": {
        "branching": [3, 3, 3, 3],
        "step_tokens": 12,
        "step_delimiter": "\n",
        "minibatch_size": 200,
    },
    "narrow [2,2,2]": {"branching": [2, 2, 2], "minibatch_size": 16},
    "wide [8,8,8]": {"branching": [8, 8, 8], "minibatch_size": 400},
    "depth 2 [8,8], 24-token cuts": {"branching": [8, 8], "step_tokens": 24, "minibatch_size": 70},
    "tau 0": {"tau": 0.0},
    "tau 0.3": {"tau": 0.3},
    "advantage_std tree": {"advantage_std": "tree"},
    "advantage_std none": {"advantage_std": "none"},
    "kl_coef 0.05": {"kl_coef": 0.05},
    "lr 1e-4, one optimizer step per iteration": {"lr": 1e-4, "minibatch_size": None},
}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def markdown_why(results: dict[str, dict]) -> str:
    """What explains the rows of markdown_table: per-iteration means over seeds (n/a: the algorithm has no
    such quantity, e.g. PPO has no groups)."""

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "n/a"

    lines = [
        "| algorithm | groups dropped (tau) | trees all wrong | optimizer steps / iteration | train reward "
        "| sampling s | learning s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {cell(r, 'frac_groups_filtered', '.2f')} | {cell(r, 'frac_trees_all_wrong', '.2f')} "
            f"| {cell(r, 'optimizer_steps_per_iteration', '.1f')} | {cell(r, 'train_reward', '.3f')} "
            f"| {cell(r, 'sample_seconds', '.0f')} | {cell(r, 'learn_seconds', '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def settings(args, sets: dict, wall: float) -> dict:
    """What the numbers of a benchmark depend on besides the code: budget, evaluation, threads, hardware."""
    return {
        "budget": args.budget,
        "seeds": args.seeds,
        "eval_problems": args.eval_problems,
        "eval_samples": args.eval_samples,
        "curve_samples": args.curve_samples,
        "evals": args.evals,
        "torch_threads": torch_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "wall_seconds": wall,
        "sets": sets,
        **hardware_keys(),
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced run: easy only, 1 seed, 50k tokens")
    p.add_argument("--ablate", action="store_true", help="TreeRPO ablations on the easy task instead")
    p.add_argument(
        "--budget", type=float, help="generated tokens per run (default 300k; quick 50k; ablate 200k)"
    )
    p.add_argument("--seeds", type=int, help="seeds per algorithm (default 3; quick 1; ablate 2)")
    p.add_argument("--difficulties", default=None, help="comma-separated: easy,hard,plan")
    p.add_argument("--algorithms", default="TreeRPO,GRPO,PPO")
    p.add_argument("--evals", type=int, default=None, help="evaluations per run along the budget (default 4)")
    p.add_argument(
        "--eval-problems", type=int, default=None, help="held-out problems (default 200; quick 100)"
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="samples per problem for pass@1 before RL and at the end point (default 16; quick 2)",
    )
    p.add_argument(
        "--curve-samples",
        type=int,
        default=None,
        help="samples per problem at the curve's intermediate points (default 4; quick 2)",
    )
    p.add_argument("--model", help="start every run from this model folder (no warm start)")
    p.add_argument("--set", action="append", default=[], metavar="[ALGO:]FIELD=VALUE")
    p.add_argument("--output", help="output folder")
    p.add_argument("--resume", action="store_true", help="reuse finished runs from OUTPUT/runs.jsonl")
    a = p.parse_args(argv)
    quick, ablate = a.quick, a.ablate
    a.budget = a.budget or (50e3 if quick else 200e3 if ablate else 300e3)
    a.seeds = a.seeds or (1 if quick else 2 if ablate else 3)
    a.difficulties = (a.difficulties or ("easy" if quick or ablate else "easy,hard")).split(",")
    a.algorithms = a.algorithms.split(",")
    a.evals = a.evals or (2 if quick else 4)
    a.eval_problems = a.eval_problems or (100 if quick else 200)
    a.eval_samples = a.eval_samples or (2 if quick else 16)
    a.curve_samples = a.curve_samples or min(a.eval_samples, 2 if quick else 4)
    a.output = Path(
        a.output or ("runs/ablate" if ablate else "runs/compare_quick" if quick else "runs/compare")
    )
    for d in a.difficulties:
        if d not in lib.DIFFICULTIES:
            p.error(f"--difficulties: unknown {d!r}; choose from {sorted(lib.DIFFICULTIES)}")
    for name in a.algorithms:
        if name not in lib.CONFIGS:
            p.error(f"--algorithms: unknown {name!r}; choose from {sorted(lib.CONFIGS)}")
    return a


class RunStore:
    """Finished runs in runs.jsonl, keyed by what determines them (for --resume)."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.done = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.done[record["key"]] = record
        elif path.exists():
            path.unlink()

    def get_or_run(self, key: dict, fn):
        k = json.dumps(key, sort_keys=True, default=str)
        if k in self.done:
            lib.log(f"    reusing {key['label']} seed {key['seed']} from {self.path}")
            return self.done[k]["run"]
        result = fn()
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": k, "run": result}) + "\n")
        return result


def run_difficulty(args, difficulty: str, variants: dict[str, tuple[str, dict]], sets: dict, store: RunStore):
    """Every (variant, seed) of one difficulty; variants: label -> (algorithm, overrides)."""
    model = args.model or lib.warm_model(difficulty, sets.get("*", {}))
    spec = lib.DIFFICULTIES[difficulty]
    evaluators = {
        k: lib.evaluator(
            model,
            spec["env_config"],
            problems=args.eval_problems,
            samples=k,
            max_tokens=spec["eval_tokens"],
            env=lib.env_of(difficulty),
        )
        for k in {args.eval_samples, args.curve_samples}
    }
    before = evaluators[args.eval_samples]()
    lib.log(
        f"[{difficulty}] model {model}: before RL pass@1 {before['pass@1']:.3f}  greedy "
        f"{before['greedy']:.3f}"
        f"  len {before['response_tokens']:.1f}"
    )
    runs = {label: [] for label in variants}
    for seed in range(args.seeds):
        for label, (algorithm, overrides) in variants.items():
            values = lib.load_settings(
                algorithm, difficulty, {**sets.get("*", {}), **sets.get(algorithm, {}), **overrides}
            )
            key = {
                "label": label,
                "difficulty": difficulty,
                "seed": seed,
                "budget": args.budget,
                "model": model,
                "values": values,
                "evals": args.evals,
                "eval": [args.eval_problems, args.eval_samples, args.curve_samples],
            }
            train = functools.partial(
                lib.run,
                algorithm,
                values,
                model,
                seed,
                evaluators[args.curve_samples],
                budget=args.budget,
                num_evals=args.evals,
                before=before,
                evaluate_final=evaluators[args.eval_samples],
            )
            runs[label].append(store.get_or_run(key, train))
    equal_prompts = min(sum(r["points"][-1]["prompts"] for r in rs) / len(rs) for rs in runs.values())
    equal_seconds = min(sum(r["train_seconds"] for r in rs) / len(rs) for rs in runs.values())
    results = {label: lib.aggregate(rs, equal_prompts, equal_seconds) for label, rs in runs.items()}
    return before, runs, results


def main(argv=None) -> dict:
    args = parse_args(argv)
    sets = lib.parse_sets(args.set)
    args.output.mkdir(parents=True, exist_ok=True)
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    start = time.perf_counter()
    store = RunStore(args.output / "runs.jsonl", args.resume)
    if args.ablate:
        variants = {name: ("TreeRPO", o) for name, o in ABLATIONS.items()}
        title = "TreeRPO ablations"
    else:
        variants = {name: (name, {}) for name in args.algorithms}
        title = "TreeRPO vs GRPO vs PPO"
    lib.log(
        f"{title}: {args.difficulties} x {list(variants)} x {args.seeds} seeds, {args.budget / 1e3:.0f}k "
        f"generated tokens per run, held-out {args.eval_problems} problems x {args.eval_samples} samples"
    )
    results, md = (
        {},
        [
            f"## {title}",
            "",
            f"Budget {args.budget / 1e3:.0f}k generated tokens per run, {args.seeds} seed(s) each; "
            f"held-out test split, {args.eval_problems} problems, pass@1 = mean over "
            f"{args.eval_samples} samples at T=1 before RL and at the end point ({args.curve_samples} at "
            "the curve's other points); mean ± std over seeds. 'train s' = wall-clock seconds inside "
            "algo.train() (evaluations excluded), torch threads "
            f"{torch_threads()}. 'at equal train s' / 'at equal prompts' interpolate each curve linearly at "
            "the smallest mean training seconds / prompts any row reached.",
            "",
        ],
    )
    for difficulty in args.difficulties:
        before, runs, res = run_difficulty(args, difficulty, variants, sets, store)
        results[difficulty] = {"before": before, **res}
        results.setdefault("curves", {})[difficulty] = {
            label: [{k: r[k] for k in ("seed", "train_seconds", "points")} for r in rs]
            for label, rs in runs.items()
        }
        md.append(
            lib.markdown_table(f"{difficulty} ({lib.DIFFICULTIES[difficulty]['env_config']})", before, res)
        )
        md.append(markdown_why(res))
        lib.plot_curves(runs, f"{title}: {difficulty}", args.output / f"curves_{difficulty}.png")
        lib.save_json(args.output / "results.json", results)
        (args.output / "results.md").write_text("\n".join(md))
    wall = round(time.perf_counter() - start, 1)
    results["settings"] = settings(args, sets, wall)
    lib.save_json(args.output / "results.json", results)
    md.append(f"Wall time of the whole benchmark: {wall / 60:.1f} min.\n")
    (args.output / "results.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)
    final = {
        "output": str(args.output),
        "wall_seconds": wall,
        **{
            d: {
                k: {"pass@1": round(v["accuracy_mean"], 4), "greedy": round(v["greedy_mean"], 4)}
                for k, v in results[d].items()
                if k != "before"
            }
            for d in args.difficulties
        },
    }
    print(json.dumps({**final, **hardware_keys()}), flush=True)
    return results


if __name__ == "__main__":
    main()
