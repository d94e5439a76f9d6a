"""RLlib's evaluation inside TreeRPO: held-out pass@1, pass@K, greedy accuracy and response length every
``evaluation_interval`` iterations, under the results' ``evaluation`` key.

One evaluation path: the env runners run the same :class:`rllib_treerpo.sampling.evaluation.Evaluator` that
`treerpo eval` and the job's before/after evaluations run, on their own backend (the weights they sample
with), so nothing loads a second copy of the model. Where it runs:

- ``evaluation_num_env_runners: 0`` (default): the training env runners, after the iteration's weight sync
  (the local one, or the remote ones in parallel);
- ``evaluation_num_env_runners: n``: RLlib's evaluation env runner group (n remote TreeEnvRunners), given the
  learners' weights first.

The held-out problems are cut into the Evaluator's batches (50 problems, each seeded by the run's seed and its
first index), and the batches are spread over the runners: the numbers do not depend on how many runners
evaluate, and equal a single Evaluator's (`treerpo eval` of the same weights with the same seed). A batch lost
with its runner is evaluated again on another one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rllib_treerpo.sampling.evaluation import problem_batches, summarize

logger = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_BATCH = 3


def evaluation_settings(eval_config: Any) -> dict[str, Any]:
    """What an env runner's Evaluator needs, from RLlib's evaluation config (TreeRPOConfig in evaluation)."""
    return {
        "env_config": dict(eval_config.env_config),
        "samples": int(eval_config.evaluation_samples),
        "max_new_tokens": eval_config.tree_spec().response_tokens,
        "temperature": float(eval_config.temperature),
        "seed": int(eval_config.seed or 0),
    }


def _batch_call(settings: dict, start: int, stop: int):
    def call(runner):
        return start, runner.evaluate_problems(settings, start, stop)

    return call


def evaluate_held_out(algo: Any, iteration: int) -> dict[str, float]:
    """The held-out summary of the policy the env runners hold now (see the module docstring), plus
    ``seconds`` and ``iteration`` (the training iterations behind these weights)."""
    from rllib_treerpo.rllib.weight_sync import WeightSync

    eval_config = algo.evaluation_config
    start = time.perf_counter()
    group = algo.eval_env_runner_group
    if group is not None:  # dedicated evaluation runners: they need the learners' current weights
        WeightSync()(algo.learner_group, group, eval_config, version=iteration, wait=True)
    else:
        group = algo.env_runner_group
    settings = evaluation_settings(eval_config)
    batches = problem_batches(int(eval_config.evaluation_duration))
    rows = _evaluate_batches(group, settings, batches)
    summary = summarize(rows)
    summary["seconds"] = time.perf_counter() - start
    summary["iteration"] = iteration
    # RLlib's usual evaluation headline (what RLlib users and Tune examples select on): the mean reward.
    summary["env_runners"] = {"episode_return_mean": summary.get("mean_reward", 0.0)}
    return summary


def _evaluate_batches(group, settings: dict, batches: list[tuple[int, int]]) -> list[dict]:
    """Rows of every batch, in problem order; batches spread over the healthy remote runners (or the local
    runner when there are none); a batch lost with its runner goes to another one."""
    if group.num_remote_workers() == 0:
        return [row for b in batches for row in _batch_call(settings, *b)(group.local_env_runner)[1]]
    done: dict[int, list] = {}
    attempts = dict.fromkeys((b[0] for b in batches), 0)
    while len(done) < len(batches):
        pending = [b for b in batches if b[0] not in done]
        runners = sorted(group.healthy_env_runner_ids())
        if not runners:
            if group.local_env_runner is None:
                raise RuntimeError(
                    f"evaluation: no healthy env runner left for held-out problems {pending[0][0]}.."
                    f"{pending[-1][1] - 1}; see the env runners' errors above"
                )
            for b in pending:
                done[b[0]] = _batch_call(settings, *b)(group.local_env_runner)[1]
            break
        for b in pending:
            attempts[b[0]] += 1
            if attempts[b[0]] > MAX_ATTEMPTS_PER_BATCH:
                raise RuntimeError(
                    f"evaluation: held-out problems {b[0]}..{b[1] - 1} were lost with their env runner "
                    f"{MAX_ATTEMPTS_PER_BATCH} times; see the env runners' errors above"
                )
        results = group.foreach_env_runner(
            [_batch_call(settings, *b) for b in pending],
            remote_worker_ids=[runners[i % len(runners)] for i in range(len(pending))],
            local_env_runner=False,
        )
        done.update(dict(results))
        lost = [b for b in pending if b[0] not in done]
        if lost:
            logger.warning("evaluation: held-out batches %s lost with their runner; evaluated again", lost)
    return [row for start, _ in batches for row in done[start]]
