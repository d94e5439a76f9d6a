"""Cluster soak: a worker node removed at a random moment of each run, on a 3-node Ray cluster on one machine.

Each run is a child process with its own cluster (benchmarks/cluster_lib.py: a head node with the driver and
its learner, two worker nodes with one env runner each, placed by ``custom_resources_per_env_runner``).
TreeRPO (tiny random model) trains ``--iterations`` iterations; a thread removes one worker node
(``Cluster.remove_node``: every process of the node killed) during an iteration drawn from 2 to iterations-1,
at a moment drawn within the first iteration's duration from its start; a new worker node is added at the
next iteration boundary.
Reported per run: the iteration the removal hit, iterations finished, trees per iteration, runner losses and
restarts in the metrics, seconds per iteration before and after the removal, whether the added node runs an
env runner at the end.

Then the weight sync (``--sync-runners``, ``--sync-nodes``): one cluster with two worker nodes, a larger
random model (``--sync-hidden``), 1, 2 and 4 env runners on 1 and 2 nodes; per setting the seconds of a
sync until every runner has the weights (median of ``--syncs``) and the bytes each node's object store took
in (raylet counters). Then tables and one JSON line.

Run: python -m benchmarks.cluster_soak --runs 5 --iterations 8 [--seed 0] [--prompts 32] [--logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rllib_treerpo.learner.precision import hardware_keys

RUNNERS = 2
SYNC_ARCHITECTURE = {"num_layers": 4, "num_heads": 8, "intermediate_size": 1024, "max_positions": 256}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="draws the removal moments and nodes")
    p.add_argument("--prompts", type=int, default=32, help="prompts_per_iteration")
    p.add_argument("--sync-runners", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--sync-nodes", type=int, nargs="*", default=[1, 2])
    p.add_argument("--sync-hidden", type=int, default=512, help="hidden size of the weight-sync model")
    p.add_argument("--syncs", type=int, default=3, help="timed syncs per setting (after one untimed)")
    p.add_argument("--logs", type=Path, help="keep each child's output here (default: a temporary folder)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # run index: this process is one run
    p.add_argument("--sync-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- one soak run (child process)
# -----------------------------------------------------------------------------
def one_run(args: argparse.Namespace) -> dict:
    from benchmarks.cluster_lib import local_cluster

    with local_cluster(RUNNERS, log_to_driver=True) as (cluster, nodes):
        return soak(args, cluster, nodes)


def soak(args: argparse.Namespace, cluster, nodes: list) -> dict:
    from rllib_treerpo.rllib.config import TreeRPOConfig

    rng = random.Random(args.seed * 1000 + args.child)
    config = TreeRPOConfig.from_yaml(
        None,
        {
            "model_name_or_path": args.model,
            "env_config": {"num_ops": 1},
            "branching": [4, 4],
            "step_tokens": 16,
            "prompts_per_iteration": args.prompts,
            "num_env_runners": RUNNERS,
            "custom_resources_per_env_runner": {"runner_node": 1},
            "seed": args.child,
        },
    )
    config.fault_tolerance(delay_between_env_runner_restarts_s=0)
    algo = config.build_algo()
    try:
        return iterate(args, algo, cluster, nodes, rng)
    finally:
        algo.stop()


def iterate(args: argparse.Namespace, algo, cluster, nodes: list, rng: random.Random) -> dict:
    """Iteration 1; the node removal drawn over iterations 2 .. iterations - 1 (a random iteration, a random
    moment of it); a new node added at the first iteration boundary after the removal."""
    from benchmarks.cluster_lib import RemoveDuring, add_runner_node, runner_nodes, wait_for_runners

    rows, times = [], []
    t0 = time.perf_counter()
    rows.append(algo.train())
    times.append(time.perf_counter() - t0)
    victim = rng.choice(sorted(nodes, key=lambda n: n.node_id))
    at = rng.randint(2, max(2, args.iterations - 1))
    remover = RemoveDuring(cluster, victim, at, 0.9 * times[0], rng)
    added = None
    for it in range(2, args.iterations + 1):
        if remover.removed.is_set() and added is None:  # a node joins again, at an iteration boundary
            added = add_runner_node(cluster)
            added_before = it
        remover.starting(it)
        t0 = time.perf_counter()
        rows.append(algo.train())
        times.append(time.perf_counter() - t0)
    remover.join()
    if added is None:
        added, added_before = add_runner_node(cluster), None
    removal = {
        "node": victim.node_id[:8],
        "drawn_iteration": at,
        "delay_s": round(remover.delay_s, 2),
        "during_iteration": remover.during,
        "added_before_iteration": added_before,
    }
    result = summarise(rows, times, removal, args.prompts)
    result["runners_back_after_s"] = round(wait_for_runners(algo), 1)
    result["added_node_runs_a_runner"] = added.node_id in runner_nodes(algo).values()
    result["restarts_after_last_iteration"] = getattr(algo, "_env_runner_restarts", 0)
    return result


def summarise(rows: list[dict], times: list[float], removal: dict, prompts: int) -> dict:
    hit = removal.get("during_iteration") or len(rows)
    before, after = times[: hit - 1], times[hit:]
    return {
        "removal": removal,
        "iterations": len(rows),
        "trees": [int(r["tree/trees"]) for r in rows],
        "full_iterations": sum(int(r["tree/trees"]) == prompts for r in rows),
        "runner_losses": int(sum(r["perf/env_runner_failures"] for r in rows)),
        "resampled_trees": int(sum(r["perf/resampled_trees"] for r in rows)),
        "restarts_in_metrics": int(rows[-1]["perf/env_runner_restarts_lifetime"]),
        "healthy_runners": [int(r["perf/env_runners_healthy"]) for r in rows],
        "seconds_per_iteration": [round(t, 2) for t in times],
        "seconds_before": round(statistics.mean(before), 2) if before else None,
        "seconds_after": round(statistics.mean(after), 2) if after else None,
    }


# --- weight sync against runners and nodes (child process)
# --------------------------------------------------------------------
def sync_settings(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(n, r) for n in args.sync_nodes for r in args.sync_runners if r >= n]


def sync_run(args: argparse.Namespace) -> list[dict]:
    """Worker node A offers {runner_node: 4, node_a: 4}, B {runner_node: 4}: runners on 1 node ask node_a,
    on 2 nodes a share of runner_node that fits half of them on each."""
    from benchmarks.cluster_lib import local_cluster

    with local_cluster(0, log_to_driver=True) as (cluster, _):
        most = max(args.sync_runners)
        cluster.add_node(num_cpus=most, resources={"runner_node": most, "node_a": most})
        cluster.add_node(num_cpus=most, resources={"runner_node": most})
        cluster.wait_for_nodes()
        return [sync_setting(args, nodes, runners, most) for nodes, runners in sync_settings(args)]


def sync_setting(args: argparse.Namespace, nodes: int, runners: int, most: int) -> dict:
    import ray

    from benchmarks.cluster_lib import runner_nodes, timed_sync, weights_bytes
    from rllib_treerpo.rllib.config import TreeRPOConfig

    head = ray.get_runtime_context().get_node_id()
    per_node = -(-runners // nodes)
    resources = {"node_a": most / runners} if nodes == 1 else {"runner_node": most / per_node}
    config = TreeRPOConfig.from_yaml(
        None,
        {
            "model_name_or_path": args.model,
            "env_config": {"num_ops": 1},
            "branching": [2],
            "step_tokens": 4,
            "prompts_per_iteration": runners,
            "num_env_runners": runners,
            "custom_resources_per_env_runner": resources,
            "dtype": "float32",
        },
    )
    algo = config.build_algo()
    try:
        placed = runner_nodes(algo)
        timed_sync(algo)  # untimed: the first sync of a fresh setting
        syncs = [timed_sync(algo) for _ in range(args.syncs)]
        last = syncs[-1]["node_bytes"]
        row = {
            "nodes": len(set(placed.values())),
            "runners": runners,
            "weights_bytes": weights_bytes(algo),
            "object_bytes": syncs[-1]["object_bytes"],
            "objects_put": syncs[-1]["objects_put"],
            "seconds": round(statistics.median(s["seconds"] for s in syncs), 3),
            "bytes_driver_node": last.get(head, 0),
            "bytes_runner_nodes": sorted((b for n, b in last.items() if n != head), reverse=True),
            "bytes_moved": sum(b for n, b in last.items() if n != head),
        }
    finally:
        algo.stop()
    print(f"sync {json.dumps(row)}", flush=True)
    return row


# --- the soak (parent)
# ----------------------------------------------------------------------------------------
def run_child(extra: list[str], log: Path) -> tuple[dict | list | None, str, int]:
    cmd = [sys.executable, "-m", "benchmarks.cluster_soak", *extra]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[-1][len("RESULT ") :]) if lines else None), text, proc.returncode


def soak_table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| run | removed: node, iteration, s | iterations | full | trees per iteration | runner losses | "
        "restarts: in metrics + after | s/iteration before, after | added node runs a runner |",
        "|" + "---|" * 9,
    ]
    for i, r in enumerate(results):
        k = r.get("removal", {})
        lines.append(
            f"| {i} | {k.get('node')}, {k.get('during_iteration')}, {k.get('delay_s')} | "
            f"{r['iterations']}/{args.iterations} | {r.get('full_iterations')} | "
            f"{' '.join(map(str, r.get('trees', [])))} | {r.get('runner_losses')} | "
            f"{r.get('restarts_in_metrics')} + {r.get('restarts_after_last_iteration')} | "
            f"{r.get('seconds_before')}, {r.get('seconds_after')} | {r.get('added_node_runs_a_runner')} |"
        )
    return "\n".join(lines)


def sync_table(rows: list[dict]) -> str:
    lines = [
        "| runner nodes | runners | object MB | s per sync | MB into the driver's node | "
        "MB into each runner node |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = " / ".join(f"{b / 2**20:.1f}" for b in r["bytes_runner_nodes"] if b)
        lines.append(
            f"| {r['nodes']} | {r['runners']} | {r['object_bytes'] / 2**20:.1f} | {r['seconds']:.3f} | "
            f"{r['bytes_driver_node'] / 2**20:.1f} | {each} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child is not None or args.sync_child:
        result = one_run(args) if args.child is not None else sync_run(args)
        print("RESULT " + json.dumps(result), flush=True)
        return {}
    from rllib_treerpo.models.tiny import TEST_ARCHITECTURE, save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        model = save_tiny_model(Path(tmp) / "tiny_lm", **TEST_ARCHITECTURE)
        common = ["--model", model, "--seed", str(args.seed), "--iterations", str(args.iterations)]
        common += ["--prompts", str(args.prompts)]
        results = []
        for i in range(args.runs):
            result, text, code = run_child(["--child", str(i), *common], logs / f"run_{i}.log")
            result = result or {"iterations": 0, "trees": []}
            result.update(exit_code=code, tracebacks=text.count("Traceback (most recent call last)"))
            results.append(result)
            print(f"run {i}: {json.dumps(result)}", flush=True)
        sync_model = save_tiny_model(Path(tmp) / "sync_lm", hidden_size=args.sync_hidden, **SYNC_ARCHITECTURE)
        sync_args = ["--sync-child", "--model", sync_model, "--syncs", str(args.syncs)]
        sync_args += [
            "--sync-runners",
            *map(str, args.sync_runners),
            "--sync-nodes",
            *map(str, args.sync_nodes),
        ]
        sync, _, _ = run_child(sync_args, logs / "sync.log")
    summary = {
        "runs": args.runs,
        "finished": sum(r["iterations"] == args.iterations for r in results),
        "iterations": sum(r["iterations"] for r in results),
        "full_iterations": sum(r.get("full_iterations", 0) for r in results),
        "node_failures_reported": sum(r.get("runner_losses", 0) > 0 for r in results),
        "runner_losses": sum(r.get("runner_losses", 0) for r in results),
        "restarts": sum(
            r.get("restarts_in_metrics", 0) + r.get("restarts_after_last_iteration", 0) for r in results
        ),
        "added_node_runs_a_runner": sum(bool(r.get("added_node_runs_a_runner")) for r in results),
        "tracebacks": sum(r["tracebacks"] for r in results),
        "prompts_per_iteration": args.prompts,
        "weight_sync": sync,
        "per_run": results,
    }
    print(soak_table(results, args))
    print(sync_table(sync or []))
    print(json.dumps({**summary, **hardware_keys(), "cpu_count": os.cpu_count()}))
    return summary


if __name__ == "__main__":
    main()
