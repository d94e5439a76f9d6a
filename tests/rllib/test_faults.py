"""Env runner faults: a runner lost during an iteration costs no trees.

RLlib's style (rllib/algorithms/tests/test_worker_failures.py): runners fail at chosen worker indices and
calls, counted by a named Ray actor that survives their restarts. With two remote runners, a share lost with
its runner is grown again on the healthy one with the same seed and weights, so the run equals one without
failures; the loss is reported (perf/env_runner_failures) and so is the restart (perf/env_runner_restarts),
after which the restarted runner holds the learner's weights version.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from envs.base import ReasoningEnv
from rllib_treerpo.rllib.algorithm import TreeRPOConfig
from rllib_treerpo.rllib.env_runner import TreeEnvRunner

SMALL = {
    "branching": [2, 2],
    "step_tokens": 6,
    "prompts_per_iteration": 4,
    "tau": 0.0,
    "lr": 1e-3,
    "seed": 0,
    "num_env_runners": 2,  # and no local env runner (create_local_env_runner: null)
}
COUNTER = "treerpo_test_fault_counter"


class ParityEnv(ReasoningEnv):
    """Reward 1 when the response's first character has an even code: about half the leaves of a random model,
    so advantages, losses and weights depend on exactly which trees were grown."""

    def __init__(self, **kwargs):
        super().__init__(max_steps=2, **kwargs)

    def _sample_problem(self, rng, options):
        i = int(rng.integers(1000))
        return str(i), f"{i}:", ""

    def _score(self, response, answer):
        return float(bool(response) and ord(response[0]) % 2 == 0)


ITERATIONS = 4


class FaultCounter:
    """Counts each worker index's sample() calls across restarts; says which call must fail, and how."""

    def __init__(self):
        self.plan, self.calls = {}, {}

    def reset(self, plan):
        self.plan, self.calls = plan, {}

    def on_sample(self, worker_index):
        self.calls[worker_index] = self.calls.get(worker_index, 0) + 1
        return self.plan.get(worker_index, {}).get(self.calls[worker_index])


class FaultyRunner(TreeEnvRunner):
    """A TreeEnvRunner that raises, or exits hard like a killed process, when the counter says so."""

    def sample(self, **kwargs):
        import ray

        mode = ray.get(ray.get_actor(COUNTER).on_sample.remote(self.worker_index))
        if mode == "raise":
            raise RuntimeError(f"injected failure in env runner {self.worker_index}")
        if mode == "exit":
            os._exit(1)  # no exception, no cleanup: what kill -9 or the OOM killer leaves behind
        return super().sample(**kwargs)


def build(model_dir, **overrides):
    config = TreeRPOConfig.from_yaml(None, {**SMALL, "model_name_or_path": model_dir, **overrides})
    config.env = ParityEnv
    config.env_runners(env_runner_cls=FaultyRunner)
    config.fault_tolerance(delay_between_env_runner_restarts_s=0)
    return config.build_algo()


def learner_weights(algo):
    state = algo.learner_group.get_state(components="learner/rl_module")["learner"]
    return {k: torch.as_tensor(v) for k, v in state["rl_module"][DEFAULT_MODULE_ID].items()}


def learner_version(algo):
    return algo.learner_group.get_state(components="learner/rl_module")["learner"]["weights_seq_no"]


def trace(algo, iterations):
    rows = []
    for _ in range(iterations):
        r = algo.train()
        rows.append(
            {
                "trees": r["tree/trees"],
                "reward": r["reward/mean"],
                "loss": r["learners"][DEFAULT_MODULE_ID]["loss/policy_loss"],
                "failures": r["perf/env_runner_failures"],
                "restarts": r["perf/env_runner_restarts"],
                "restarts_lifetime": r["perf/env_runner_restarts_lifetime"],
                "resampled": r["perf/resampled_trees"],
                "healthy": r["perf/env_runners_healthy"],
            }
        )
    return rows


@pytest.fixture(scope="module")
def counter(ray_session):
    import ray

    # The test module's classes travel to the runner actors by value (tests/ is not on their sys.path).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray.remote(num_cpus=0)(FaultCounter).options(name=COUNTER).remote()
    yield actor
    ray.kill(actor)


def wait_for_runners(algo, timeout_s=120.0):
    """Until Ray has restarted every runner and RLlib has restored it (a new process loads the model:
    seconds)."""
    import time

    group = algo.env_runner_group
    deadline = time.monotonic() + timeout_s
    while len(group.healthy_env_runner_ids()) < group.num_remote_workers():
        assert time.monotonic() < deadline, "the env runners did not come back"
        time.sleep(0.5)
        algo.restore_env_runners(group)


@pytest.fixture(scope="module")
def reference(tiny_lm_dir, counter, tmp_path_factory):
    """An uninterrupted run: per-iteration trees, rewards, losses, the final weights; a checkpoint after 2."""
    import ray

    ray.get(counter.reset.remote({}))
    checkpoint = tmp_path_factory.mktemp("faults") / "iter2"
    algo = build(tiny_lm_dir)
    try:
        rows = trace(algo, 2)
        algo.save_to_path(str(checkpoint))
        rows += trace(algo, ITERATIONS - 2)
        return rows, learner_weights(algo), checkpoint
    finally:
        algo.stop()


def assert_same_run(rows, weights, reference):
    ref_rows, ref_weights, _ = reference
    # rewards and losses that vary: a different tree or weight would show
    assert len({r["reward"] for r in ref_rows}) > 1 and all(r["loss"] != 0 for r in ref_rows)
    for key in ("trees", "reward", "loss"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_lost_runners_shares_are_grown_again_and_the_run_is_unchanged(tiny_lm_dir, counter, reference):
    import ray

    # Runner 1 raises in iteration 2 (its 2nd call): runner 2 grows its share. Runner 2 exits hard in
    # iteration 3 (its 4th call: it also grew runner 1's share); runner 1 grows it if back by then, else the
    # local runner.
    ray.get(counter.reset.remote({1: {2: "raise"}, 2: {4: "exit"}}))
    algo = build(tiny_lm_dir)
    try:
        rows = trace(algo, 3)
        wait_for_runners(algo)  # restored here, reported by the next iteration
        rows += trace(algo, ITERATIONS - 3)
        assert [r["trees"] for r in rows] == [4] * ITERATIONS  # every iteration trains on all its trees
        assert [r["failures"] for r in rows] == [0, 1, 1, 0]
        assert rows[0]["healthy"] == rows[-1]["healthy"] == 2 and rows[2]["healthy"] in (1, 2)
        # Iteration 3 re-grows share 2, and share 1 too when runner 2 was growing it as well (runner 1 not
        # back yet).
        assert [r["resampled"] for r in rows][:2] == [0, 2] and rows[2]["resampled"] in (2, 4)
        assert sum(r["restarts"] for r in rows) == 2 and rows[-1]["restarts_lifetime"] == 2
        versions = algo.env_runner_group.foreach_env_runner(
            lambda r: r._weights_seq_no, local_env_runner=False
        )
        assert versions == [learner_version(algo)] * 2  # the restarted runners hold the learner's weights
        assert_same_run(rows, learner_weights(algo), reference)  # same seeds, same weights: the same run
    finally:
        algo.stop()


def test_resumed_run_with_two_runners_equals_the_uninterrupted_one(tiny_lm_dir, counter, reference):
    import ray

    ray.get(counter.reset.remote({}))
    resumed = build(tiny_lm_dir)
    try:
        resumed.restore_from_path(str(reference[2]))
        rows = reference[0][:2] + trace(resumed, ITERATIONS - 2)
        assert_same_run(rows, learner_weights(resumed), reference)
    finally:
        resumed.stop()


def test_shares_cover_the_iteration_with_seeds_independent_of_the_runner():
    from rllib_treerpo.rllib.shares import share_sizes
    from rllib_treerpo.sampling.sampler import sampling_seed

    assert share_sizes(7, 3) == {1: 3, 2: 2, 3: 2} and share_sizes(7, 0) == {0: 7}
    assert share_sizes(2, 3) == {1: 1, 2: 1}  # a runner without prompts gets no call
    assert sampling_seed(0, 2, 5) != sampling_seed(0, 1, 5) != sampling_seed(0, 1, 4)


# --- the re-sampling logic on a fake runner group (no Ray): who grows which share, with which seed
# ----------------
class FakeRunner:
    last_wait_seconds = 0.0

    def __init__(self, index):
        self.index = index

    def sample(self, *, num_prompts, seed):
        return [(seed, i, self.index) for i in range(num_prompts)]

    def get_metrics(self):
        return {"runner": self.index}


class FakeGroup:
    """Remote runners 1..n; ``dies`` lists (runner, call number) pairs that are lost; ``back`` brings runners
    back on the k-th restore."""

    def __init__(self, n, dies=(), local=False, back=None):
        self.runners = {i: FakeRunner(i) for i in range(1, n + 1)}
        self.healthy, self.dies, self.calls = set(self.runners), set(dies), {i: 0 for i in self.runners}
        self.local_env_runner = FakeRunner(0) if local else None
        self.back, self.restores = dict(back or {}), 0

    def num_remote_workers(self):
        return len(self.runners)

    def healthy_env_runner_ids(self):
        return sorted(self.healthy)

    def foreach_env_runner(self, funcs, remote_worker_ids=None, local_env_runner=False):
        if local_env_runner:
            return [funcs(self.local_env_runner)]
        out = []
        for f, i in zip(funcs, remote_worker_ids, strict=True):
            if i not in self.healthy:
                continue
            self.calls[i] += 1
            if (i, self.calls[i]) in self.dies:
                self.healthy.discard(i)
            else:
                out.append(f(self.runners[i]))
        return out

    def restore(self):
        self.restores += 1
        restored = self.back.pop(self.restores, [])
        self.healthy |= set(restored)
        return restored


class FakeConfig:
    prompts_per_iteration = 5
    seed = 0
    restart_failed_env_runners = True
    env_runner_restore_timeout_s = 30.0


def grow(group, iteration=3):
    from rllib_treerpo.rllib.shares import sample_shares

    return sample_shares(group, FakeConfig(), iteration, group.restore)


def seeds_and_prompts(sampled):
    return [(seed, i) for seed, i, _ in sampled.trees]


def test_a_lost_share_is_grown_again_on_a_healthy_runner_with_its_own_seed():
    clean = grow(FakeGroup(2))
    lost = grow(FakeGroup(2, dies=[(1, 1)]))
    assert seeds_and_prompts(lost) == seeds_and_prompts(clean) and len(clean.trees) == 5
    assert {runner for *_, runner in lost.trees} == {2}  # runner 2 grew both shares
    assert (lost.failures, lost.resampled_trees, clean.failures, lost.healthy_runners) == (1, 3, 0, 2)


def test_with_every_remote_runner_down_the_local_runner_or_a_restarted_one_grows_the_shares():
    clean = seeds_and_prompts(grow(FakeGroup(2)))
    both_die = [(1, 1), (2, 1)]
    local = grow(FakeGroup(2, dies=both_die, local=True))
    assert seeds_and_prompts(local) == clean and {r for *_, r in local.trees} == {0}
    group = FakeGroup(2, dies=both_die, back={2: [1]})  # runner 1 is back at the second restore
    waited = grow(group)
    assert seeds_and_prompts(waited) == clean and {r for *_, r in waited.trees} == {1} and group.restores == 2
    assert (waited.failures, waited.resampled_trees) == (2, 5)


def test_a_share_that_keeps_killing_runners_or_no_runner_left_is_an_error():
    kills = [(1, 1), (2, 1), (2, 2), (1, 2), (1, 3), (2, 3)]
    with pytest.raises(RuntimeError, match="share 1 .* lost with its env runner 3 times"):
        grow(FakeGroup(2, dies=kills, back={1: [1, 2], 2: [1, 2], 3: [1, 2]}))
    config = FakeConfig()
    config.restart_failed_env_runners = False
    from rllib_treerpo.rllib.shares import sample_shares

    group = FakeGroup(1, dies=[(1, 1)])
    with pytest.raises(RuntimeError, match="no healthy env runner left"):
        sample_shares(group, config, 0, group.restore)
