"""A real pretrained model through the whole job on CPU: `treerpo train` then `treerpo eval` of its
final_model, once per precision setting, with the job's peak memory.

For each setting (fp32, with and without gradient checkpointing; ``dtype: auto``, the config as shipped; bf16
with fp32 master weights, i.e. mixed precision, with and without checkpointing) it runs ``treerpo train
configs/smollm2_cpu.yaml --set model_name_or_path=MODEL ...`` as a subprocess (the sampler and the learner
both live in the driver: num_env_runners 0, num_learners 0), samples the resident memory of the driver every
50 ms (and of the driver plus every process it started, Ray's included), then ``treerpo eval`` on the run's
final_model. A setting passes when both exit 0, the run wrote its checkpoints and final_model, and the
evaluation wrote its summary. Prints a table (wall and CPU seconds, mean sampling and learner seconds per
iteration, peak memory) and ends with one JSON line that names the CPU (precision.hardware_keys). A CPU with
bf16 instructions can be measured as one without them: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``
limits torch's and oneDNN's kernels to AVX2 (the JSON line records it as cpu_limited_by).

    treerpo get-model smollm2-135m-instruct --output models/smollm2
    OMP_NUM_THREADS=1 python -m benchmarks.real_train --model models/smollm2 [--iterations 3] \\
        [--out runs/real_train]
        [--settings "fp32,auto"] [--set eval_problems=0 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from rllib_treerpo.learner.precision import hardware_keys

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "fp32": ["dtype=float32", "gradient_checkpointing=false"],
    "fp32 + ckpt": ["dtype=float32", "gradient_checkpointing=true"],
    "auto": [
        "dtype=auto"
    ],  # the config as shipped: float32 or bf16 mixed, whichever this machine computes natively
    "bf16 mixed": ["dtype=bfloat16", "mixed_precision=true", "gradient_checkpointing=false"],
    "bf16 mixed + ckpt": ["dtype=bfloat16", "mixed_precision=true", "gradient_checkpointing=true"],
}


def run_measured(command: list[str], log: Path) -> dict:
    """Run ``command`` with stdout/stderr to ``log``; its exit code, seconds and peak resident memory (GB) of
    the process alone and of the process plus its descendants."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = {"driver": 0.0, "tree": 0.0}
        done = threading.Event()

        def watch() -> None:
            parent = psutil.Process(proc.pid)
            while not done.wait(0.05):
                try:
                    driver = parent.memory_info().rss
                    tree = driver + sum(_rss(p) for p in parent.children(recursive=True))
                except psutil.Error:
                    continue
                peak["driver"] = max(peak["driver"], driver / 2**30)
                peak["tree"] = max(peak["tree"], tree / 2**30)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        # The kernel's high-water mark of the driver's resident memory (a peak between two samples included);
        # wait4 reports it for this child (and the processes it reaped, all smaller than it).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
    return {
        "exit": proc.returncode,
        "seconds": time.perf_counter() - start,
        "peak_gb": max(peak["driver"], usage.ru_maxrss * 1024 / 2**30),  # ru_maxrss: KiB on Linux
        # CPU seconds of the driver (and the children it reaped): unlike wall seconds, other jobs' load on a
        # shared machine hardly moves them (one thread)
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "sampled_gb": peak["driver"],
        "tree_gb": peak["tree"],
    }


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def phase_seconds(metrics: Path) -> dict:
    """Mean seconds per iteration of sampling and of the learner, wall and the driver's CPU
    (perf/*_seconds)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    out = {}
    for key, metric in (
        ("sample_s", "perf/sample_seconds"),
        ("learn_s", "perf/learn_seconds"),
        ("sample_cpu_s", "perf/sample_cpu_seconds"),  # the driver's CPU seconds: robust to other jobs' load
        ("learn_cpu_s", "perf/learn_cpu_seconds"),
    ):
        values = [r[metric] for r in rows if metric in r]
        out[key] = round(sum(values) / len(values), 1) if values else None
        out[key + "_per_iteration"] = [round(v, 1) for v in values]
    return out


def measure_setting(name: str, args, out: Path) -> dict:
    """`treerpo train` of one setting, then `treerpo eval` of its final_model/: the table's row."""
    treerpo = [sys.executable, "-m", "rllib_treerpo.jobs.cli"]
    tag = name.replace(" ", "").replace("+", "_")
    run = out / tag
    sets = [f"model_name_or_path={Path(args.model).resolve()}", f"iterations={args.iterations}"]
    sets += SETTINGS[name] + args.set
    train = [*treerpo, "train", "configs/smollm2_cpu.yaml", "--output", str(run), "--overwrite"]
    train += [arg for s in sets for arg in ("--set", s)]
    load_before = os.getloadavg()[0]  # a shared machine: other jobs' load beside this run
    result = run_measured(train, out / f"{tag}.train.log")
    evaluation = [*treerpo, "eval", "--model", str(run / "final_model")]  # its env and budget: the run's
    evaluation += ["--problems", str(args.problems), "--output", str(run / "eval_final")]
    checked = run_measured(evaluation, out / f"{tag}.eval.log") if result["exit"] == 0 else {"exit": None}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    final = run / "eval_final" / "summary.json"
    resolved = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    return {
        "setting": name,
        "train_exit": result["exit"],
        "eval_exit": checked["exit"],
        "seconds": round(result["seconds"], 1),
        "cpu_seconds": round(result["cpu_seconds"], 1),
        "seconds_per_iteration": round(
            summary.get("job_seconds_this_run", float("nan")) / args.iterations, 1
        ),
        "dtype": resolved.get("dtype"),
        "gradient_checkpointing": resolved.get("gradient_checkpointing"),
        **phase_seconds(run / "metrics.jsonl"),
        "peak_driver_gb": round(result["peak_gb"], 2),
        "peak_driver_sampled_gb": round(result["sampled_gb"], 2),
        "peak_all_gb": round(result["tree_gb"], 2),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("iter_*")),
        "final_model": (run / "final_model" / "config.json").exists(),
        "final_eval": json.loads(final.read_text()) if final.exists() else None,
    }


def print_table(rows: list[dict], hardware: dict) -> None:
    print(f"hardware: {hardware}")
    print(
        f"{'setting':<18} {'dtype':<9} {'train':>5} {'eval':>5} {'s':>7} {'cpu s':>7} {'s/it':>6} "
        f"{'sample':>7} "
        f"{'learn':>6} {'cpu':>6} {'cpu':>6} {'peak GiB':>8} {'all GiB':>7}"
    )
    for r in rows:
        print(
            f"{r['setting']:<18} {r['dtype']!s:<9} {r['train_exit']!s:>5} {r['eval_exit']!s:>5} "
            f"{r['seconds']:>7.1f} "
            f"{r['cpu_seconds']:>7.1f} {r['seconds_per_iteration']:>6.1f} {r['sample_s']!s:>7} "
            f"{r['learn_s']!s:>6} "
            f"{r['sample_cpu_s']!s:>6} {r['learn_cpu_s']!s:>6} "
            f"{r['peak_driver_gb']:>8.2f} {r['peak_all_gb']:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Hugging Face folder (treerpo get-model ...)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--problems", type=int, default=8, help="held-out problems of the final evaluation")
    parser.add_argument("--out", default="runs/real_train")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {list(SETTINGS)}"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="passed to every setting's `treerpo train` (e.g. eval_problems=0 for a shorter run)",
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.settings.split(","):
        rows.append(measure_setting(name, args, out))
        print("row " + json.dumps(rows[-1]), flush=True)  # kept if a later setting is cut short
    hardware = hardware_keys()
    print_table(rows, hardware)
    line = {"benchmark": "real_train", "model": args.model, "threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps({**line, **hardware, "rows": rows}))


if __name__ == "__main__":
    main()
