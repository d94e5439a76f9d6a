"""Sampling overlapped with learning: max_staleness 0 (sample -> learn -> sync) against 1 (the runner grows
the next iteration's trees while the learner trains), in one run.

The default task (configs/tiny_arith.yaml) with one remote env runner and the learner in the driver, one core
each (OMP_NUM_THREADS=1 here; Ray gives the runner actor one thread per CPU it asks for). Each seed runs
``treerpo train`` twice, k = 0 then k = 1, with the same settings, in subprocesses; both see the same trees'
prompts (the shares' seeds do not depend on k) and train the same number of iterations (equal trees). Held-out
evaluation (the job's before/after: 200 problems x 16 samples by default) is outside the timed iterations;
evaluations along training and checkpoints are off.

Reported per k (mean over seeds): seconds per iteration (the whole loop of ``treerpo train``: training,
saving and the progress plot, metrics.jsonl's ``wall_s``; iterations 3..: the first is sequential for all k),
the learner's idle share (its waits for trees / wall time) and the runner's (its waits between two shares /
wall time), the trained trees' staleness, and held-out pass@1 and greedy accuracy after training
(mean +- std over seeds). The last line is JSON with ``sync_seconds_per_iteration`` and
``async_seconds_per_iteration``.

    python -m benchmarks.pipeline [--seeds 0,1,2] [--iterations 30] [--out runs/pipeline] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rllib_treerpo.learner.precision import hardware_keys

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = ("pass@1", "greedy_accuracy")


def run_one(config: str, seed: int, k: int, iterations: int, sets: list[str], out: Path) -> dict:
    """One ``treerpo train`` run; its per-iteration timing and held-out results."""
    folder = out / f"k{k}_seed{seed}"
    overrides = [f"seed={seed}", f"max_staleness={k}", f"iterations={iterations}", "num_env_runners=1"]
    overrides += ["num_learners=0", "eval_every=0", "checkpoint_every=0", *sets]
    command = [sys.executable, "-m", "rllib_treerpo.jobs.cli", "train", config, "--output", str(folder)]
    command += ["--overwrite", *[a for s in overrides for a in ("--set", s)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # the first iteration is sequential for every k, the second carries the first's saving and plot
    rows = [r for r in rows if "time_s" in r][2:]
    wall = sum(r["wall_s"] for r in rows)  # the whole loop: training, saving, the progress plot
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "k": k,
        "seed": seed,
        "iterations_timed": len(rows),
        "seconds_per_iteration": wall / len(rows),
        "learn_seconds_per_iteration": sum(r["perf/learn_seconds"] for r in rows) / len(rows),
        "learner_idle_share": sum(r["perf/learner_wait_seconds"] for r in rows) / wall,
        "sampler_idle_share": sum(r["perf/sampler_wait_seconds"] for r in rows) / wall,
        "staleness_mean": float(np.mean([r["perf/staleness_mean"] for r in rows])),
        "staleness_max": max(r["perf/staleness_max"] for r in rows),
        "dropped_stale_trees": sum(r.get("perf/dropped_stale_trees", 0) for r in rows),
        **{f"{key}_before": summary["eval_before"][key] for key in HELD_OUT},
        **{f"{key}_after": summary["eval_after"][key] for key in HELD_OUT},
        "held_out": f"{summary['eval_after']['problems']}x{summary['eval_after']['samples']}",
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def print_table(results: list[dict]) -> dict[int, dict]:
    """The table per k; returns the means (and held-out stds) per k."""
    keys = ("seconds_per_iteration", "learn_seconds_per_iteration", "learner_idle_share")
    keys += ("sampler_idle_share", "staleness_mean")
    print(
        "| max_staleness | s / iteration | learner s / iteration | learner idle | runner idle | staleness "
        "| held-out pass@1 | held-out greedy |\n|---|---|---|---|---|---|---|---|"
    )
    summary = {}
    for k in sorted({r["k"] for r in results}):
        rows = [r for r in results if r["k"] == k]
        means = {key: mean_std([r[key] for r in rows])[0] for key in keys}
        for key in HELD_OUT:
            means[f"{key}_after"], means[f"{key}_after_std"] = mean_std([r[f"{key}_after"] for r in rows])
        # with k = 0: what a perfect overlap would leave, max(waiting for trees, the rest) / iteration
        means["overlap_bound"] = max(means["learner_idle_share"], 1 - means["learner_idle_share"])
        summary[k] = means
        print(
            f"| {k} | {means['seconds_per_iteration']:.2f} | {means['learn_seconds_per_iteration']:.2f} | "
            f"{means['learner_idle_share']:.0%} | {means['sampler_idle_share']:.0%} | "
            f"{means['staleness_mean']:.2f} | "
            f"{means['pass@1_after']:.3f} ± {means['pass@1_after_std']:.3f} | "
            f"{means['greedy_accuracy_after']:.3f} ± {means['greedy_accuracy_after_std']:.3f} |"
        )
    before = results[0]
    print(f"(before RL: pass@1 {before['pass@1_before']:.3f}, greedy {before['greedy_accuracy_before']:.3f})")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny_arith.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--out", default="runs/pipeline")
    parser.add_argument("--set", action="append", default=[], help="more overrides, as treerpo train --set")
    parser.add_argument("--rows", help="print the report of the per-run JSON lines of an earlier run's log")
    args = parser.parse_args()
    if args.rows:
        lines = Path(args.rows).read_text().splitlines()
        return report(args, [json.loads(line) for line in lines if line.startswith('{"k"')])
    out = Path(args.out).resolve()
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for k in (0, 1):  # interleaved: a change of the machine's load hits both
            results.append(run_one(args.config, seed, k, args.iterations, args.set, out))
            print(json.dumps(results[-1]), flush=True)
    report(args, results)


def report(args, results: list[dict]) -> None:
    """The table, the ratio against its bound, and the JSON line."""
    summary = print_table(results)
    ratio = summary[1]["seconds_per_iteration"] / summary[0]["seconds_per_iteration"]
    print(
        f"k = 1 takes {ratio:.2f}x the seconds per iteration of k = 0; overlapping sampling and learning "
        f"perfectly would take {summary[0]['overlap_bound']:.2f}x (k = 0's longer part / its iteration)"
    )
    line = {
        "benchmark": "pipeline",
        "config": args.config,
        "sets": args.set,
        "iterations": args.iterations,
        "sync_seconds_per_iteration": summary[0]["seconds_per_iteration"],
        "async_seconds_per_iteration": summary[1]["seconds_per_iteration"],
        "async_over_sync": ratio,
        "per_k": summary,
        "runs": results,
    }
    print(json.dumps({**line, **hardware_keys()}))


if __name__ == "__main__":
    main()
