"""`treerpo train` over several seeds: held-out accuracy before and after, mean +- std (the README's make
train table).

Each seed is ``treerpo train CONFIG --set seed=S --output OUT/seed_S --overwrite`` in a subprocess (the warm
start does not depend on the run's seed: the shipped one, or one built once and cached); then each run's
summary.json and warmstart_build.json (how its warm start was built: machine, seconds, held-out accuracy) are
read. ``--rebuild-warmstart``: the warm start is built on this machine into a fresh cache
(OUT/warmstart_cache, ``TREERPO_BUILD_WARMSTART=1``) by the first run, as on a machine without the shipped
one. Prints the tables and ends with one JSON line.

    python -m benchmarks.seeds [--config configs/tiny_arith.yaml] [--seeds 0,1,2] [--out runs/seeds] \\
        [--rebuild-warmstart] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rllib_treerpo.learner.precision import hardware_keys

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("pass@1", "greedy_accuracy", "mean_response_tokens")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny_arith.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--set", action="append", default=[], help="more overrides, as treerpo train --set")
    parser.add_argument(
        "--rebuild-warmstart",
        action="store_true",
        help="build the warm start on this machine into a fresh cache (not the shipped one)",
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    env = dict(os.environ)
    if args.rebuild_warmstart:
        cache = out / "warmstart_cache"
        shutil.rmtree(cache, ignore_errors=True)
        env.update(TREERPO_CACHE=str(cache), TREERPO_BUILD_WARMSTART="1")
    rows, builds = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = out / f"seed_{seed}"
        command = [sys.executable, "-m", "rllib_treerpo.jobs.cli", "train", args.config, "--output", str(run)]
        command += ["--overwrite", "--set", f"seed={seed}", *[a for s in args.set for a in ("--set", s)]]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, env=env)
        summary = json.loads((run / "summary.json").read_text())
        record = run / "warmstart_build.json"
        build = json.loads(record.read_text()) if record.exists() else None
        builds[build["weights_sha256"] if build else None] = build
        row = {"seed": seed, "seconds": round(time.perf_counter() - start, 1)}
        for when in ("before", "after"):
            row.update({f"{key}_{when}": summary[f"eval_{when}"][key] for key in KEYS})
        row["problems_x_samples"] = f"{summary['eval_after']['problems']}x{summary['eval_after']['samples']}"
        rows.append(row)

    _print_tables(rows, builds)
    line = {"benchmark": "seeds", "config": args.config, "sets": args.set, "rows": rows}
    line |= {"rebuild_warmstart": args.rebuild_warmstart, "warmstart_builds": list(builds.values())}
    print(json.dumps({**line, **hardware_keys()}))


def _print_tables(rows: list[dict], builds: dict) -> None:
    """Mean +- std before and after, the change of each seed, and where the warm start came from."""

    def stat(key: str) -> str:
        values = np.array([r[key] for r in rows], dtype=float)
        return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"

    print("| model | pass@1 (T=1) | greedy | response tokens |\n|---|---|---|---|")
    for when in ("before", "after"):
        print(f"| {when} | " + " | ".join(stat(f"{k}_{when}") for k in KEYS) + " |")
    print(
        "\n| seed | pass@1 before -> after | greedy before -> after (change) | seconds |\n|---|---|---|---|"
    )
    for r in rows:
        change = 100 * (r["greedy_accuracy_after"] - r["greedy_accuracy_before"])
        print(
            f"| {r['seed']} | {r['pass@1_before']:.3f} -> {r['pass@1_after']:.3f} | "
            f"{r['greedy_accuracy_before']:.3f} -> {r['greedy_accuracy_after']:.3f} ({change:+.1f} points) "
            f"| {r['seconds']} |"
        )
    if len(builds) > 1:
        print(f"WARNING: the runs started from {len(builds)} different warm starts")
    for build in builds.values():
        print(_describe(build))


def _describe(build: dict | None) -> str:
    """One line: where the runs' warm start came from."""
    if build is None:
        return "warm start: no build record (a model folder without build.json)"
    held = build.get("held_out") or {}
    numerics = " ".join(f"{k}={v}" for k, v in build["numerics_env"].items()) or "no numerics env"
    return (
        f"warm start {build['weights_sha256'][:12]}: built {build['built_at']} on {build['cpu_capability']} "
        f"({build['threads']} threads; {numerics}), torch {build['torch']}, SFT {build['sft_seconds']}s; "
        f"held-out pass@1 {held.get('pass@1')} greedy {held.get('greedy_accuracy')}"
    )


if __name__ == "__main__":
    main()
