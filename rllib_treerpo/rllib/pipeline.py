"""Sampling ahead of the learner: ``max_staleness`` = k >= 1 (docs/algorithm.md s.7).

With k = 0 an iteration is strictly sample -> learn -> sync, and the env runners wait while the learner
trains. With k >= 1, before the learner trains on iteration i's trees, each remote env runner is asked for its
share of iteration i + k (the same share and seed as k = 0 would use: rllib/shares.py), queued on the runner
as a Ray actor call. Ray runs an actor's calls in order, and the weight sync after the update is queued behind
it (rllib/weight_sync.py), so those trees are grown with the weights the runner holds now: version i, while
the learner makes version i + 1. They are trained on at iteration i + k, by a learner at version i + k: every
tree is at most k versions old by construction, and a slow learner makes the runners wait rather than grow
trees that would be too old to use.

The tags each tree carries (``Tree.weights_version``) are checked anyway: a share whose trees are more than k
versions old (a runner that missed a sync) is dropped, counted (``perf/dropped_stale_trees``), and grown again
with the current weights, like a share lost with its runner. So every iteration still trains on all its
prompts' trees. In-flight shares are not part of a checkpoint: a resumed run grows its first iteration again,
synchronously, with the restored weights (same prompts and seeds; fresher weights than the uninterrupted run
had for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rllib_treerpo.rllib.shares import share_call, share_sizes
from rllib_treerpo.sampling.sampler import sampling_seed

logger = logging.getLogger(__name__)

SAMPLE_TAG = "treerpo_sample"


@dataclass
class Collected:
    """An iteration's shares grown ahead, share -> (trees, runner metrics, wait s, sampling s), and those
    lost with their runner, share -> (runner, prompts)."""

    done: dict[int, tuple] = field(default_factory=dict)
    lost: dict[int, tuple[int, int]] = field(default_factory=dict)


class SamplePipeline:
    """The iterations whose shares are being grown ahead on the remote env runners."""

    def __init__(self) -> None:
        self._ahead: dict[int, dict[int, tuple[int, int]]] = {}  # iteration -> share -> (runner, prompts)

    def iterations_ahead(self) -> list[int]:
        return sorted(self._ahead)

    def submit(self, group, config, iteration: int) -> None:
        """Queue each share of ``iteration`` on its own runner, if healthy (the others are grown when the
        iteration is collected)."""
        sizes = share_sizes(config.prompts_per_iteration, group.num_remote_workers())
        healthy = set(group.healthy_env_runner_ids())
        shares = [k for k in sizes if k in healthy]
        if shares:
            group.foreach_env_runner_async(
                [share_call(k, sizes[k], sampling_seed(config.seed, k, iteration)) for k in shares],
                tag=f"{SAMPLE_TAG}_{iteration}",
                remote_worker_ids=shares,
            )
        self._ahead[iteration] = {k: (k, sizes[k]) for k in shares}

    def collect(self, group, iteration: int) -> Collected:
        """Wait for ``iteration``'s shares grown ahead (none: nothing was submitted for it)."""
        submitted = self._ahead.pop(iteration, {})
        out = Collected()
        if not submitted:
            return out
        tag = f"{SAMPLE_TAG}_{iteration}"
        for _, (share, *rest) in group.fetch_ready_async_reqs(tags=tag, timeout_seconds=None):
            out.done[share] = tuple(rest)
        out.lost = {k: where for k, where in submitted.items() if k not in out.done}
        if out.lost:
            logger.warning(
                "iteration %d: env runner(s) %s lost while growing shares %s ahead; growing them again",
                iteration + 1,
                sorted({runner for runner, _ in out.lost.values()}),
                sorted(out.lost),
            )
        return out

    def discard(self) -> None:
        """Forget what is in flight (the weights were restored: those trees belong to another run)."""
        self._ahead.clear()


def drop_stale(done: dict[int, tuple], version: int, max_staleness: int) -> tuple[dict[int, tuple], int]:
    """The shares of ``done`` whose trees are at most ``max_staleness`` versions behind ``version``, and the
    number of trees dropped (their shares are grown again)."""
    kept, dropped = {}, 0
    for share, result in done.items():
        trees = result[0]
        if any(version - t.weights_version > max_staleness for t in trees):
            dropped += len(trees)
        else:
            kept[share] = result
    return kept, dropped


def staleness(trees: list, version: int) -> list[int]:
    """Versions between the learner's weights and each tree's."""
    return [version - t.weights_version for t in trees]
