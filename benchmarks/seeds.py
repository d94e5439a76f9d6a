"""`treerpo train` over several seeds: held-out accuracy before and after, mean +- std (the README's make
train table).

Each seed is ``treerpo train CONFIG --set seed=S --output OUT/seed_S --overwrite`` in a subprocess (the warm
start is built once and cached: it does not depend on the run's seed); then each run's summary.json is read.
Prints a table and ends with one JSON line.

    python -m benchmarks.seeds [--config configs/tiny_arith.yaml] [--seeds 0,1,2] [--out runs/seeds] \\
        [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = out / f"seed_{seed}"
        command = [sys.executable, "-m", "rllib_treerpo.jobs.cli", "train", args.config, "--output", str(run)]
        command += ["--overwrite", "--set", f"seed={seed}", *[a for s in args.set for a in ("--set", s)]]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        summary = json.loads((run / "summary.json").read_text())
        row = {"seed": seed, "seconds": round(time.perf_counter() - start, 1)}
        for when in ("before", "after"):
            row.update({f"{key}_{when}": summary[f"eval_{when}"][key] for key in KEYS})
        row["problems_x_samples"] = f"{summary['eval_after']['problems']}x{summary['eval_after']['samples']}"
        rows.append(row)

    def stat(key: str) -> str:
        values = np.array([r[key] for r in rows], dtype=float)
        return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"

    print("| model | pass@1 (T=1) | greedy | response tokens |\n|---|---|---|---|")
    for when in ("before", "after"):
        print(f"| {when} | " + " | ".join(stat(f"{k}_{when}") for k in KEYS) + " |")
    print(f"seconds per run: {[r['seconds'] for r in rows]}")
    line = {"benchmark": "seeds", "config": args.config, "sets": args.set, "rows": rows}
    print(json.dumps({**line, **hardware_keys()}))


if __name__ == "__main__":
    main()
