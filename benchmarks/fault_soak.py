"""Fault soak: ``kill -9`` of an env runner at a random moment of each run ("nothing lost, nothing silent").

Each run is a child process with its own Ray session (jobs/ray_session.start_ray): TreeRPO with two remote env
runners (tiny random model: tests/conftest.py's recipe) trains ``--iterations`` iterations; after the first
one, a thread SIGKILLs one runner's process (pids through ``foreach_env_runner(lambda r: os.getpid())``) at a
moment drawn uniformly over the next ``iterations - 2`` iterations' expected time. Reported per run: the
iteration the kill hit, iterations finished, trees per iteration, runner losses and restarts reported in the
metrics (a restart that completes after the last iteration is counted apart), whether every runner was back
with the learner's weights version at the end, and the Python tracebacks in the run's output. Then a table and
one JSON line.

Run: python -m benchmarks.fault_soak --runs 5 --iterations 8 [--seed 0] [--prompts 32] [--logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rllib_treerpo.learner.precision import hardware_keys

RUNNERS = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments and victims")
    p.add_argument("--prompts", type=int, default=32, help="prompts_per_iteration")
    p.add_argument("--logs", type=Path, help="keep each run's output here (default: a temporary folder)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # run index: this process is one run
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- one run (child process)
# ----------------------------------------------------------------------------------
def one_run(args: argparse.Namespace) -> dict:
    from rllib_treerpo.jobs.ray_session import start_ray
    from rllib_treerpo.rllib.config import TreeRPOConfig

    rng = random.Random(args.seed * 1000 + args.child)
    start_ray(num_cpus=max(2, os.cpu_count() or 2), log_to_driver=True)
    config = TreeRPOConfig.from_yaml(
        None,
        {
            "model_name_or_path": args.model,
            "env_config": {"num_ops": 1},
            "branching": [4, 4],
            "step_tokens": 16,
            "prompts_per_iteration": args.prompts,
            "num_env_runners": RUNNERS,
            "seed": args.child,
        },
    )
    algo = config.build_algo()
    pids = dict(algo.env_runner_group.foreach_env_runner(lambda r: (r.worker_index, os.getpid())))
    state = {"iteration": 0}
    rows, times = [], []
    t0 = time.perf_counter()
    rows.append(algo.train())
    times.append(time.perf_counter() - t0)
    victim = rng.choice(sorted(pids))
    delay = rng.uniform(0, max(1, args.iterations - 2) * times[0])
    kill = {"victim": victim, "pid": pids[victim], "delay_s": round(delay, 2)}

    def killer():
        time.sleep(delay)
        kill["during_iteration"] = state["iteration"] + 1
        os.kill(pids[victim], signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    for it in range(1, args.iterations):
        state["iteration"] = it
        t0 = time.perf_counter()
        rows.append(algo.train())
        times.append(time.perf_counter() - t0)
    thread.join()
    result = summarise(rows, times, kill)
    result.update(back_with_current_weights(algo))
    algo.stop()
    return result


def summarise(rows: list[dict], times: list[float], kill: dict) -> dict:
    return {
        "kill": kill,
        "iterations": len(rows),
        "trees": [int(r["tree/trees"]) for r in rows],
        "runner_losses": int(sum(r["perf/env_runner_failures"] for r in rows)),
        "resampled_trees": int(sum(r["perf/resampled_trees"] for r in rows)),
        "restarts_in_metrics": int(rows[-1]["perf/env_runner_restarts_lifetime"]),
        "healthy_runners": [int(r["perf/env_runners_healthy"]) for r in rows],
        "seconds_per_iteration": [round(t, 2) for t in times],
    }


def back_with_current_weights(algo, timeout_s: float = 120.0) -> dict:
    """Waits for the killed runner to be restarted and restored; then its weights version against the
    learner's."""
    group = algo.env_runner_group
    start = time.monotonic()
    while len(group.healthy_env_runner_ids()) < RUNNERS and time.monotonic() - start < timeout_s:
        time.sleep(0.5)
        algo.restore_env_runners(group)
    # restored here, after the last iteration: the next iteration's perf/env_runner_restarts would report it
    pending = getattr(algo, "_env_runner_restarts", 0)
    versions = group.foreach_env_runner(lambda r: r._weights_seq_no, local_env_runner=False)
    learner = algo.learner_group.get_state(components="learner/rl_module")["learner"]["weights_seq_no"]
    return {
        "runners_back": len(group.healthy_env_runner_ids()),
        "restarts_after_last_iteration": pending,
        "waited_for_restart_s": round(time.monotonic() - start, 1),
        "weights_current": versions == [learner] * RUNNERS,
    }


# --- the soak (parent)
# ----------------------------------------------------------------------------------------
def run_child(args: argparse.Namespace, index: int, model: str, logs: Path) -> dict:
    log = logs / f"run_{index}.log"
    cmd = [sys.executable, "-m", "benchmarks.fault_soak", "--child", str(index), "--model", model]
    cmd += ["--iterations", str(args.iterations), "--seed", str(args.seed), "--prompts", str(args.prompts)]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT ") :]) if lines else {"iterations": 0, "trees": []}
    result["exit_code"] = proc.returncode
    result["tracebacks"] = text.count("Traceback (most recent call last)")
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["log"] = str(log)
    return result


def table(results: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| run | kill: runner, iteration, s | iterations | trees per iteration | runner losses | restarts: "
        "in metrics + after the run | runners back, weights current | tracebacks |"
    )
    lines = [head, "|" + "---|" * 8]
    for i, r in enumerate(results):
        k = r.get("kill", {})
        lines.append(
            f"| {i} | {k.get('victim')}, {k.get('during_iteration')}, {k.get('delay_s')} | "
            f"{r['iterations']}/{args.iterations} | {' '.join(map(str, r['trees']))} | "
            f"{r.get('runner_losses')} | "
            f"{r.get('restarts_in_metrics')} + {r.get('restarts_after_last_iteration')} | "
            f"{r.get('runners_back')}/{RUNNERS}, {r.get('weights_current')} | "
            f"{r['tracebacks']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return {}
    from rllib_treerpo.models.tiny import TEST_ARCHITECTURE, save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        model = save_tiny_model(Path(tmp) / "tiny_lm", **TEST_ARCHITECTURE)
        results = []
        for i in range(args.runs):
            results.append(run_child(args, i, model, logs))
            print(f"run {i}: {json.dumps({k: v for k, v in results[-1].items() if k != 'log'})}", flush=True)
    full = [r["trees"] == [args.prompts] * args.iterations for r in results]
    summary = {
        "runs": args.runs,
        "iterations": args.iterations,
        "prompts_per_iteration": args.prompts,
        "runs_complete_with_all_trees": sum(full),
        "runner_losses": sum(r.get("runner_losses", 0) for r in results),
        "restarts_in_metrics": sum(r.get("restarts_in_metrics", 0) for r in results),
        "restarts_after_last_iteration": sum(r.get("restarts_after_last_iteration", 0) for r in results),
        "weights_current": sum(bool(r.get("weights_current")) for r in results),
        "tracebacks": sum(r["tracebacks"] for r in results),
        "per_run": [{k: v for k, v in r.items() if k != "log"} for r in results],
    }
    print(table(results, args))
    print(json.dumps({**summary, **hardware_keys()}))
    return summary


if __name__ == "__main__":
    main()
