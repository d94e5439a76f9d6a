"""TreeRPO on a Ray cluster of three nodes on this machine (ray.cluster_utils.Cluster, as RLlib's node-failure
tests): env runners placed on worker nodes, trees that say which node grew them, a weight sync that costs one
transfer per node, a worker node removed at a random moment (its runner's share grown again on the other node,
a node added back gets a runner), a model folder that only the driver's node has (a node started in a mount
namespace where that folder does not exist), and a learner's node lost (the job ends in one line naming the
checkpoint to resume from; the resume finishes the run). docs/cluster.md: what this proves and what not.
"""

from __future__ import annotations

import random
import shutil
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from benchmarks.cluster_lib import (
    HiddenNode,
    RemoveDuring,
    add_runner_node,
    can_hide_folders,
    connect,
    local_cluster,
    runner_nodes,
    timed_sync,
    wait_for_runners,
    weights_bytes,
)
from rllib_treerpo.rllib.algorithm import TreeRPOConfig

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

SMALL = {
    "branching": [2, 2],
    "step_tokens": 4,
    "prompts_per_iteration": 4,
    "tau": 0.0,
    "seed": 0,
    "env_config": {"num_ops": 1},
    "num_minibatches": 1,
    "num_env_runners": 2,
    "custom_resources_per_env_runner": {"runner_node": 1},
}
# Weights of ~0.6 MB: above Ray's 100 KB inline limit, so a sync goes through the object store.
ARCHITECTURE = {"hidden_size": 128, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rllib_treerpo.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("cluster_lm"), **ARCHITECTURE)


@pytest.fixture(scope="module")
def cluster():
    """A head node (the driver and its learner) and two worker nodes offering {runner_node: 1}, in a Ray temp
    folder of their own; the shared single-node Ray session of the other tests is put back afterwards."""
    import ray

    from tests.conftest import RAY_TEST_SESSION

    # The test's functions run in the actors, where tests/ is not importable.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    had_session = ray.is_initialized()
    if had_session:
        ray.shutdown()
    try:
        with local_cluster(runner_nodes=2) as (local, nodes):
            yield SimpleNamespace(cluster=local, nodes=nodes)
    finally:
        if had_session:
            ray.init(**RAY_TEST_SESSION)


def build(model, **overrides):
    config = TreeRPOConfig.from_yaml(None, {**SMALL, "model_name_or_path": str(model), **overrides})
    config.fault_tolerance(delay_between_env_runner_restarts_s=0)
    return config.build_algo()


def assert_one_copy_each(sync: dict, nodes: set) -> None:
    """The sync's object reached exactly ``nodes``, each once (the other nodes took in nothing)."""
    size = sync["object_bytes"]
    got = sync["node_bytes"]
    assert {n for n, b in got.items() if b > 0} == nodes, sync
    assert all(size <= got[n] < 1.5 * size for n in nodes), sync


def train(algo, iterations):
    rows = []
    for _ in range(iterations):
        r = algo.train()
        origins = {(t.origin["env_runner"], t.origin["node_id"]) for t in algo.last_trees}
        rows.append(
            {
                "trees": r["tree/trees"],
                "origins": origins,
                "failures": r["perf/env_runner_failures"],
                "restarts": r["perf/env_runner_restarts"],
                "resampled": r["perf/resampled_trees"],
            }
        )
    return rows


def test_runners_on_worker_nodes_grow_the_trees_and_a_sync_is_one_transfer_per_node(cluster, model_dir):
    import ray

    head = ray.get_runtime_context().get_node_id()
    workers = {n.node_id for n in cluster.nodes}
    algo = build(model_dir)
    try:
        placed = runner_nodes(algo)
        assert set(placed.values()) == workers  # one runner on each worker node, none on the head
        rows = train(algo, 3)
        assert [r["trees"] for r in rows] == [4, 4, 4] and not any(r["failures"] for r in rows)
        # Every tree names the runner and the node that grew it: both runners' nodes, as placed.
        assert all(r["origins"] == set(placed.items()) for r in rows)

        sync, size = timed_sync(algo), weights_bytes(algo)
        # One object of the weights' size (above Ray's 100 KB inline limit: through the object store), put on
        # the driver's node and pulled once by each runner's node.
        assert sync["objects_put"] == 1 and 100_000 < size <= sync["object_bytes"] < 1.1 * size
        assert_one_copy_each(sync, {head, *workers})
    finally:
        algo.stop()


def test_a_worker_node_removed_at_a_random_moment_costs_no_trees_and_a_node_added_back_gets_a_runner(
    cluster, model_dir
):
    algo = build(model_dir)
    try:
        rows = train(algo, 1)
        t_iteration = time.perf_counter()
        rows += train(algo, 1)
        t_iteration = time.perf_counter() - t_iteration
        rng = random.Random()
        victim = rng.choice(sorted(cluster.nodes, key=lambda n: n.node_id))
        # At a random moment of iteration 3 or 4; iterations up to 6 find the runner lost.
        removal = RemoveDuring(cluster.cluster, victim, rng.choice([3, 4]), 0.9 * t_iteration, rng)
        for iteration in range(3, 7):
            removal.starting(iteration)
            rows += train(algo, 1)
        removal.join()
        cluster.nodes.remove(victim)
        added = add_runner_node(cluster.cluster)  # in the main thread: a node installs signal handlers
        cluster.nodes.append(added)
        waited = wait_for_runners(algo)
        rows += train(algo, 1)  # reports the restart

        context = (
            f"removed in iteration {removal.during} ({removal.delay_s:.1f} s into iteration "
            f"{removal.iteration}), runners back {waited:.1f} s later: {rows}"
        )
        assert [r["trees"] for r in rows] == [4] * 7, context  # every iteration trains on all its trees
        assert sum(r["failures"] for r in rows) >= 1, context  # the lost runner is reported
        assert sum(r["resampled"] for r in rows) >= 2, context  # its share was grown again
        assert sum(r["restarts"] for r in rows) >= 1, context
        placed = runner_nodes(algo)
        assert added.node_id in placed.values() and victim.node_id not in placed.values(), context
        assert rows[-1]["origins"] == set(placed.items()), context  # the new node grows trees again
    finally:
        algo.stop()


@pytest.fixture
def hidden_model(tmp_path, model_dir, cluster):
    """A copy of the model in a folder that a fourth node (2 CPUs, {hidden: 2}) cannot see."""
    why = can_hide_folders()
    if why:
        pytest.skip(f"cannot start a node that does not see a folder: {why}")
    driver_only = tmp_path / "driver_only"
    shutil.copytree(model_dir, driver_only / "model")
    node = HiddenNode(
        cluster.cluster.address,
        hide=driver_only,
        resources={"hidden": 2},
        num_cpus=2,
        env={"TREERPO_NODE_MODELS": tmp_path / "node_models"},
        log=tmp_path / "hidden_node.log",
    )
    try:
        yield SimpleNamespace(path=driver_only / "model", cache=tmp_path / "node_models")
    finally:
        node.stop()


def test_a_model_folder_only_the_driver_has_reaches_the_runners_through_the_object_store(hidden_model):
    import os

    import ray

    from rllib_treerpo.models.model_io import hf_weights
    from rllib_treerpo.rllib.model_files import server_name

    head = ray.get_runtime_context().get_node_id()
    original = str(hidden_model.path)
    algo = build(original, custom_resources_per_env_runner={"hidden": 1})
    try:
        seen = algo.env_runner_group.foreach_env_runner(
            lambda r: (os.path.isdir(original), r.model_folder, ray.get_runtime_context().get_node_id()),
            local_env_runner=False,
        )
        [node] = {n for _, _, n in seen}  # both runners on the node that cannot see the folder
        assert [s[0] for s in seen] == [False, False]
        assert all(s[1].startswith(str(hidden_model.cache)) for s in seen)  # its own copy, from the driver
        server = ray.get_actor(server_name(original))
        assert ray.get(server.stats.remote())["requests"] == 2

        rows = train(algo, 2)
        assert [r["trees"] for r in rows] == [4, 4]
        assert {n for r in rows for _, n in r["origins"]} == {node}
        sync = timed_sync(algo)  # two runners on one node: one pull there
        assert sync["objects_put"] == 1
        assert_one_copy_each(sync, {head, node})
        learner = {
            k: v.float()
            for k, v in hf_weights(
                algo.learner_group.get_state(components="learner/rl_module")["learner"]["rl_module"][
                    "default_policy"
                ]
            ).items()
        }
        for weights in algo.env_runner_group.foreach_env_runner(
            lambda r: r.backend.weights(), local_env_runner=False
        ):
            assert all(torch.equal(weights[k].float(), learner[k]) for k in learner)
    finally:
        algo.stop()


def test_a_path_neither_this_node_nor_the_driver_has_is_one_line_saying_what_to_share(cluster):
    from rllib_treerpo.rllib.model_files import local_model_folder

    # What an env runner or learner raises (here in the driver, which asks the same way: no server serves it).
    with pytest.raises(ValueError) as error:
        local_model_folder("/nowhere/model", who="env runner 1")
    message = str(error.value)
    assert "\n" not in message and "'/nowhere/model': no such folder on node" in message
    assert "(env runner 1)" in message and "every node" in message and "docs/cluster.md" in message
    assert local_model_folder("org/model") == "org/model"  # a hub name no driver serves: from_pretrained's


def test_a_learners_node_lost_ends_the_job_in_one_line_naming_the_resume_and_the_resume_finishes(
    cluster, model_dir, tmp_path
):
    """num_learners 1 on a node of its own (custom_resources_per_learner); the local env runner samples."""
    import json

    from rllib_treerpo.jobs.config import load_run_config
    from rllib_treerpo.jobs.train import LearnerLost, train

    def run(resume: bool):
        config, job, _ = load_run_config(
            None,
            {
                **SMALL,
                "model_name_or_path": str(model_dir),
                "num_env_runners": 0,
                "custom_resources_per_env_runner": {},
                "num_learners": 1,
                "custom_resources_per_learner": {"learner_node": 1},
                "iterations": 2,
                "checkpoint_every": 1,
                "eval_problems": 0,
                "eval_every": 0,  # no held-out evaluation along the way (iteration 0 included)
            },
        )
        return train(config, job, tmp_path / "run", resume=resume)

    learner_node = add_runner_node(cluster.cluster, learner_node=1)
    latest = tmp_path / "run" / "checkpoints" / "latest"  # written once the checkpoint is whole

    def remove_after_the_first_checkpoint():
        deadline = time.monotonic() + 180
        while not latest.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.cluster.remove_node(learner_node)

    thread = threading.Thread(target=remove_after_the_first_checkpoint)
    thread.start()
    try:
        with pytest.raises(LearnerLost) as lost:
            run(resume=False)
    finally:
        thread.join()
    message = str(lost.value)
    assert "\n" not in message and message.startswith("a learner died in iteration 2"), message
    assert f"continue from iter_000001 with `treerpo train --resume {tmp_path / 'run'}`" in message, message

    add_runner_node(cluster.cluster, learner_node=1)  # the cluster has a node for it again
    summary = run(resume=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["iterations"] == 2 and [r["iteration"] for r in rows] == [1, 2]
    assert all(r["tree/trees"] == 4 for r in rows)


def test_the_job_joins_a_running_cluster_with_its_nodes(cluster):
    """`treerpo train` on a node of a running cluster (here the address Ray recorded for it): start_ray joins
    it instead of starting a Ray of its own, and passes no CPU count (refused when joining)."""
    import ray

    from rllib_treerpo.jobs.ray_session import existing_cluster, start_ray

    assert existing_cluster() == cluster.cluster.address
    ray.shutdown()
    try:
        assert start_ray(log_to_driver=False)
        assert ray.get_runtime_context().gcs_address == cluster.cluster.address
    finally:
        ray.shutdown()
        connect(cluster.cluster)
