"""max_staleness: the env runners grow the next iterations' trees while the learner trains (pipeline.py).

Two remote runners on the tiny model and ParityEnv (tests/rllib/test_faults.py: its runners fail when its
counter says so). Every tree carries the version of the weights that grew it; a tree trained at iteration i
(0-based) is ``i - weights_version`` versions old.
"""

from __future__ import annotations

import time

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from tests.rllib.test_faults import build, counter, learner_weights, wait_for_runners  # noqa: F401

ITERATIONS = 4


def run(algo, iterations):
    """Per iteration: the trained trees' ages and prompts, and the pipeline's metrics."""
    rows = []
    for _ in range(iterations):
        r = algo.train()
        trained_at = algo.iteration - 1
        rows.append(
            {
                "ages": [trained_at - t.weights_version for t in algo.last_trees],
                "prompts": [t.prompt_text for t in algo.last_trees],
                "trees": r["tree/trees"],
                "loss": r["learners"][DEFAULT_MODULE_ID]["loss/policy_loss"],
                "dropped": r["perf/dropped_stale_trees"],
                "staleness_max": r["perf/staleness_max"],
                "failures": r["perf/env_runner_failures"],
                "sampler_wait": r["perf/sampler_wait_seconds"],
                "learner_wait": r["perf/learner_wait_seconds"],
            }
        )
    return rows


@pytest.fixture(scope="module")
def synchronous(tiny_lm_dir, counter):  # noqa: F811
    """max_staleness 0 (the default): rows and final weights."""
    import ray

    ray.get(counter.reset.remote({}))
    algo = build(tiny_lm_dir)
    try:
        return run(algo, ITERATIONS), learner_weights(algo)
    finally:
        algo.stop()


def test_k0_trains_only_trees_of_the_current_weights(synchronous):
    rows, _ = synchronous
    assert all(r["ages"] == [0] * 4 and r["staleness_max"] == 0 for r in rows)
    # the runners wait while the learner trains (all but the first sample follow an update)
    assert rows[0]["sampler_wait"] == 0 and all(r["sampler_wait"] > 0 for r in rows[1:])


def test_k1_trains_trees_one_version_old_on_the_same_prompts(tiny_lm_dir, counter, synchronous):  # noqa: F811
    import ray

    ray.get(counter.reset.remote({}))
    algo = build(tiny_lm_dir, max_staleness=1)
    try:
        rows = run(algo, ITERATIONS)
        weights = learner_weights(algo)
    finally:
        algo.stop()
    sync_rows, sync_weights = synchronous
    assert [r["trees"] for r in rows] == [4] * ITERATIONS
    # The first iteration has nothing grown ahead: it is the synchronous one. Every later one trains on trees
    # the previous weights grew (grown during the previous update), from the same prompts and seeds.
    assert rows[0]["ages"] == [0] * 4 and rows[0]["loss"] == sync_rows[0]["loss"]
    assert all(r["ages"] == [1] * 4 and r["staleness_max"] == 1 for r in rows[1:])
    assert [r["prompts"] for r in rows] == [r["prompts"] for r in sync_rows]
    assert all(r["dropped"] == 0 for r in rows)
    assert any(not torch.equal(weights[k], sync_weights[k]) for k in weights)  # it did learn off-policy


def test_a_slow_learner_makes_the_runners_wait_not_the_trees_older(tiny_lm_dir, counter):  # noqa: F811
    import ray

    ray.get(counter.reset.remote({}))
    algo = build(tiny_lm_dir, max_staleness=1)
    update = algo._update

    def slow_update(packs):
        time.sleep(1.5)
        return update(packs)

    algo._update = slow_update
    try:
        rows = run(algo, 3)
    finally:
        algo.stop()
    assert all(max(r["ages"]) <= 1 and r["dropped"] == 0 and r["trees"] == 4 for r in rows)
    # the share of the next iteration was grown during the update; the runner then waited for it to end
    assert all(r["sampler_wait"] > 1.0 for r in rows[2:])
    assert all(r["learner_wait"] < 1.0 for r in rows[1:])


def test_trees_too_old_are_dropped_and_grown_again_with_the_current_weights(tiny_lm_dir, counter):  # noqa: F811
    """Runner 2 misses the syncs of versions 1 and 2: its share of iteration 2 (grown with version 0 for a
    learner at version 2) is too old for max_staleness 1."""
    import ray

    ray.get(counter.reset.remote({}))
    algo = build(tiny_lm_dir, max_staleness=1)
    sync = algo._sync_weights

    def sync_missing_runner_2(learner_group, group, config, version, runner_ids=None, wait=False):
        if version in (1, 2) and not wait:
            runner_ids = [1]
        sync(learner_group, group, config, version, runner_ids=runner_ids, wait=wait)

    algo._sync_weights = sync_missing_runner_2
    try:
        rows = run(algo, ITERATIONS)
    finally:
        algo.stop()
    assert [r["dropped"] for r in rows] == [0, 0, 2, 0]  # runner 2's 2 trees at iteration 3
    assert [r["trees"] for r in rows] == [4] * ITERATIONS  # grown again: every iteration trains on all
    assert all(max(r["ages"]) <= 1 for r in rows)
    assert rows[2]["ages"] == [1, 1, 0, 0]  # runner 1's share as planned; runner 2's grown again now


def test_a_runner_killed_while_growing_ahead_loses_no_tree(tiny_lm_dir, counter, synchronous):  # noqa: F811
    import ray

    # runner 2's 3rd call is iteration 3's share, grown ahead during iteration 2's update: it dies there
    ray.get(counter.reset.remote({2: {3: "exit"}}))
    algo = build(tiny_lm_dir, max_staleness=1)
    try:
        rows = run(algo, 3)
        wait_for_runners(algo)
        rows += run(algo, ITERATIONS - 3)
        versions = algo.env_runner_group.foreach_env_runner(
            lambda r: r._weights_version, local_env_runner=False
        )
    finally:
        algo.stop()
    assert [r["trees"] for r in rows] == [4] * ITERATIONS
    assert [r["failures"] for r in rows] == [0, 0, 1, 0]
    assert [r["prompts"] for r in rows] == [r["prompts"] for r in synchronous[0]]  # same shares, same seeds
    assert all(max(r["ages"]) <= 1 for r in rows)
    # the restarted runner was told its weights' version (RLlib's restore sends none) and got the last sync
    assert versions == [ITERATIONS] * 2


def test_a_resumed_run_grows_its_first_iteration_again_with_the_restored_weights(
    tiny_lm_dir,
    counter,  # noqa: F811
    tmp_path,
):
    import ray

    ray.get(counter.reset.remote({}))
    algo = build(tiny_lm_dir, max_staleness=1)
    try:
        run(algo, 2)
        algo.save_to_path(str(tmp_path / "ckpt"))  # iteration 3's shares are in flight now
        continued = run(algo, 2)
    finally:
        algo.stop()
    resumed = build(tiny_lm_dir, max_staleness=1)
    try:
        resumed.restore_from_path(str(tmp_path / "ckpt"))
        rows = run(resumed, 2)
    finally:
        resumed.stop()
    assert [r["trees"] for r in rows] == [4, 4]
    assert rows[0]["ages"] == [0] * 4 and rows[1]["ages"] == [1] * 4  # in flight: not restored, grown again
    assert continued[0]["ages"] == [1] * 4
    assert [r["prompts"] for r in rows] == [r["prompts"] for r in continued]


def test_max_staleness_needs_remote_env_runners():
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig

    with pytest.raises(ValueError, match=r"^config field 'max_staleness' = 1: .*num_env_runners >= 1"):
        TreeRPOConfig.from_yaml(None, {"max_staleness": 1})
    with pytest.raises(ValueError, match="max_staleness"):
        TreeRPOConfig.from_yaml(None, {"max_staleness": -1, "num_env_runners": 1})
    with pytest.raises(ValueError, match="^config field 'max_staleness' = 1: release_after_sampling"):
        TreeRPOConfig.from_yaml(
            None, {"max_staleness": 1, "num_env_runners": 1, "release_after_sampling": True}
        )
    assert TreeRPOConfig.from_yaml(None, {"max_staleness": 2, "num_env_runners": 1}).max_staleness == 2


def test_two_learners_train_on_trees_grown_ahead(tiny_lm_dir, counter):  # noqa: F811
    import ray

    ray.get(counter.reset.remote({}))
    # two learner actors (one CPU each, DDP over gloo) and one runner beside them
    algo = build(tiny_lm_dir, max_staleness=1, num_learners=2, num_env_runners=1, num_cpus_per_env_runner=0)
    try:
        rows = run(algo, 3)
        first, second = algo.learner_group.foreach_learner(
            lambda learner: {
                k: v.detach().clone() for k, v in learner.module[DEFAULT_MODULE_ID].state_dict().items()
            }
        ).result_or_errors
    finally:
        algo.stop()
    assert [r["ages"] for r in rows] == [[0] * 4, [1] * 4, [1] * 4]
    assert all(torch.equal(first.get()[k], second.get()[k]) for k in first.get())  # the learners agree
