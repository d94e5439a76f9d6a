"""The learner's weights after a few iterations, as one sha256: did a change keep training bit for bit?

Trains TreeRPO on the default task from the embedded warm start (small iterations: 8 prompts, a [2, 2] tree)
for ``--iterations`` and hashes the learner's parameters. Run it on two commits (e.g. ``git worktree add
/tmp/old <commit>`` and ``cd /tmp/old && PYTHONPATH=. python -m benchmarks.fingerprint``): the same hash
means the same training, bit for bit, on this machine. Prints a table and one JSON line.

    python -m benchmarks.fingerprint [--runners 0] [--iterations 4] [--set max_staleness=0 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json

SMALL = {"prompts_per_iteration": 8, "branching": [2, 2], "num_minibatches": 2, "lr": 1e-4, "seed": 0}


def main() -> None:
    import ray
    import torch

    import rllib_treerpo
    from rllib_treerpo.jobs.cli import parse_key_values
    from rllib_treerpo.rllib.config import TreeRPOConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, default=0, help="num_env_runners")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="more fields, as treerpo train --set")
    args = parser.parse_args()
    overrides = {**SMALL, "num_env_runners": args.runners, **parse_key_values(args.set, "--set")}
    config = TreeRPOConfig.from_yaml(None, overrides)
    ray.init(num_cpus=max(2, args.runners), include_dashboard=False, logging_level="ERROR")
    algo = config.build_algo()
    try:
        rewards = [round(float(algo.train()["reward/mean"]), 4) for _ in range(args.iterations)]
        state = algo.learner_group.get_state(components="learner/rl_module")["learner"]["rl_module"]
    finally:
        algo.stop()
        ray.shutdown()
    digest = hashlib.sha256()
    for name, value in sorted(next(iter(state.values())).items()):
        digest.update(name.encode())
        digest.update(torch.as_tensor(value).float().numpy().tobytes())
    line = {
        "benchmark": "fingerprint",
        "code": rllib_treerpo.__file__,
        "overrides": overrides,
        "iterations": args.iterations,
        "rewards": rewards,
        "weights_sha256": digest.hexdigest(),
    }
    print("| code | rewards | weights sha256 |\n|---|---|---|")
    print(f"| {line['code']} | {rewards} | {digest.hexdigest()} |")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
