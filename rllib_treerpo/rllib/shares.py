"""An iteration's trees over the env runners, none lost: every iteration trains on all its prompts' trees.

The iteration's prompts are split into shares, one per remote env runner (share k = runner k's part,
``TreeEnvRunner.prompts_share``; share 0 = all of them on the local runner when there are no remote runners).
A share's seed depends only on (config seed, share index, iteration)
(:func:`rllib_treerpo.sampling.sampler.sampling_seed`), never on which runner grows it or how often that
runner has sampled: a share lost with its runner (a crash, a ``kill -9``, an exception in the env) is grown
again on a healthy runner with the same seed and the same weights, so a run with a failure gives the trees a
run without one gives; so does a resumed run.

RLlib's part (``restart_failed_env_runners``): Ray restarts the dead actor, RLlib takes it out of service, and
``Algorithm.restore_env_runners`` (before each training step, or here when no healthy runner is left) pings it
back and sets its state (weights and their version) from the local env runner or the learners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rllib_treerpo.sampling.sampler import sampling_seed

logger = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_SHARE = 3  # a share that kills this many runners in a row is an error, not bad luck


@dataclass
class SampledShares:
    """The trees of an iteration in share order, the runners' metrics, and what was lost and grown again."""

    trees: list = field(default_factory=list)
    runner_metrics: list = field(default_factory=list)
    failures: int = 0  # env runners lost while growing a share
    resampled_trees: int = 0  # trees grown again because their first runner was lost
    healthy_runners: int | None = None  # remote runners in service at the start (None: local only)
    wait_seconds: list = field(default_factory=list)  # per share: its runner's idle time before growing it
    sample_seconds: list = field(default_factory=list)  # per share: its runner's time growing it


def share_sizes(total: int, num_remote: int) -> dict[int, int]:
    """Share index -> prompts: runner k's part of ``total`` (1-based); {0: total} without remote runners."""
    from rllib_treerpo.rllib.env_runner import TreeEnvRunner

    if num_remote <= 0:
        return {0: total}
    sizes = {k: TreeEnvRunner.prompts_share(total, k, num_remote) for k in range(1, num_remote + 1)}
    return {k: n for k, n in sizes.items() if n > 0}


def share_call(share: int, num_prompts: int, seed: int) -> Callable[[Any], tuple]:
    """What a runner runs to grow a share: (share, trees, its metrics, seconds it waited before, seconds it
    sampled)."""

    def call(runner):
        start = time.perf_counter()
        trees = runner.sample(num_prompts=num_prompts, seed=seed)
        return share, trees, runner.get_metrics(), runner.last_wait_seconds, time.perf_counter() - start

    return call


def sample_shares(
    group, config, iteration: int, restore: Callable[[], list[int]], done: dict[int, tuple] | None = None
) -> SampledShares:
    """Grow every share of iteration ``iteration`` on ``group``'s runners; lost shares are grown again.
    ``done``: shares already grown (share -> (trees, metrics, wait s, sampling s): rllib/pipeline.py).

    When no healthy remote runner is left, the local env runner grows the rest, or (without one) ``restore``
    (``Algorithm.restore_env_runners``) is polled until a restarted runner is back. Raises RuntimeError when a
    share fails ``MAX_ATTEMPTS_PER_SHARE`` times, or when no runner comes back."""
    num_remote = group.num_remote_workers()
    sizes = share_sizes(config.prompts_per_iteration, num_remote)
    seeds = {k: sampling_seed(config.seed, k, iteration) for k in sizes}
    out = SampledShares()
    if num_remote == 0:
        [(_, *result)] = group.foreach_env_runner(share_call(0, sizes[0], seeds[0]), local_env_runner=True)
        return _in_share_order(out, {0: result})

    done = dict(done or {})
    attempts = dict.fromkeys(sizes, 0)
    out.healthy_runners = len(group.healthy_env_runner_ids())
    while len(done) < len(sizes):
        pending = [k for k in sizes if k not in done]
        runners = sorted(group.healthy_env_runner_ids())
        if not runners and group.local_env_runner is not None:
            _sample_locally(group.local_env_runner, pending, sizes, seeds, done)
            break
        if not runners:
            runners = _wait_for_a_runner(group, config, restore, pending)
        for k in pending:
            attempts[k] += 1
            if attempts[k] > MAX_ATTEMPTS_PER_SHARE:
                raise RuntimeError(
                    f"iteration {iteration + 1}: share {k} ({sizes[k]} prompts) was lost with its env runner "
                    f"{MAX_ATTEMPTS_PER_SHARE} times; see the env runners' errors above"
                )
        # A share goes to its own runner when that one is healthy, else round-robin over the healthy ones.
        assigned = [k if k in runners else runners[i % len(runners)] for i, k in enumerate(pending)]
        results = group.foreach_env_runner(
            [share_call(k, sizes[k], seeds[k]) for k in pending],
            remote_worker_ids=assigned,
            local_env_runner=False,
        )
        for share, *result in results:
            done[share] = tuple(result)
        lost = [k for k in pending if k not in done]
        if lost:
            failed = sorted({runner for k, runner in zip(pending, assigned, strict=True) if k not in done})
            out.failures += len(failed)
            out.resampled_trees += sum(sizes[k] for k in lost)
            logger.warning(
                "iteration %d: env runner(s) %s lost with shares %s (%d prompts); growing them again on the "
                "healthy runners with the same seeds",
                iteration + 1,  # RLlib's training_iteration of this step
                failed,
                lost,
                sum(sizes[k] for k in lost),
            )
    return _in_share_order(out, done)


def _in_share_order(out: SampledShares, done: dict[int, tuple]) -> SampledShares:
    for k in sorted(done):
        trees, metrics, wait_seconds, sample_seconds = done[k]
        out.trees += trees
        out.runner_metrics.append(metrics)
        out.wait_seconds.append(wait_seconds)
        out.sample_seconds.append(sample_seconds)
    return out


def _wait_for_a_runner(group, config, restore: Callable[[], list[int]], pending: list[int]) -> list[int]:
    """Every remote runner is down and there is no local one: wait for Ray to restart one (loading a model
    takes a while), at most ``env_runner_restore_timeout_s``; ``restore`` sets a restarted runner's state."""
    deadline = time.monotonic() + config.env_runner_restore_timeout_s
    while config.restart_failed_env_runners and time.monotonic() < deadline:
        restore()
        runners = sorted(group.healthy_env_runner_ids())
        if runners:
            return runners
        time.sleep(1.0)
    raise RuntimeError(
        f"no healthy env runner left to grow shares {pending} (restart_failed_env_runners: "
        f"{config.restart_failed_env_runners}, waited up to env_runner_restore_timeout_s: "
        f"{config.env_runner_restore_timeout_s} s); see the env runners' errors above"
    )


def _sample_locally(runner, pending: list[int], sizes: dict, seeds: dict, done: dict) -> None:
    """Every remote runner is down: the local env runner (it holds the current weights) grows their shares."""
    for k in pending:
        _, *result = share_call(k, sizes[k], seeds[k])(runner)
        done[k] = tuple(result)
