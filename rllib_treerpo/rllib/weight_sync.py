"""The policy's weights from the learners to the env runners; the sampler's copy out of the update's way.

When the local env runner samples and the local learner updates in one process (num_env_runners 0,
num_learners 0: the laptop setup), the two copies of the model never need to be in memory at the same peak:
the sampler's copy (in ``dtype``) is freed once the trees are grown (GenerationBackend.drop_weights) and
refilled by the weight sync after the update, straight from the learner's master tensors (no cast copy: the
sampler casts as it copies), so the update's peak (gradients next to the float32 masters and AdamW state)
has no sampler's copy beside it (docs/real_models.md s.8).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import ray
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_treerpo.learner.memory import trim_heap
from rllib_treerpo.rllib.env_runner import WEIGHTS_VERSION

logger = logging.getLogger(__name__)
_SYNC_IDS = itertools.count()  # one tag per sync in this process, whichever WeightSync sends it


def sampler_beside_learner(env_runner_group: Any, config: Any) -> bool:
    """The local env runner samples and the local learner updates in this one process."""
    return (
        config.num_learners == 0
        and env_runner_group.num_remote_workers() == 0
        and env_runner_group.local_env_runner is not None
    )


def free_sampler_for_update(env_runner_group: Any, config: Any) -> None:
    """Drop the local sampler's weights until the next :func:`sync_weights` (a learner in this process)."""
    if sampler_beside_learner(env_runner_group, config):
        env_runner_group.local_env_runner.drop_weights()
        trim_heap()  # the copy and the sampling's K/V caches


class WeightSync:
    """The learners' weights to the env runners, in the sampler's dtype, with their version.

    ``version`` is the policy version (training iterations behind the weights); each runner keeps it and
    tags every tree it grows with it (rllib/pipeline.py reads the tags). With no remote runner the local one
    takes the state directly: RLlib's EnvRunnerGroup.sync_weights ray.put()s the state even then, and the
    object store's pages it touched would stay in the driver's resident memory. From a learner in this
    process the master tensors themselves go, as views.

    To remote runners the state goes once through the object store, as a call queued on each runner without
    waiting: Ray runs an actor's calls in order, so trees a runner was asked for before this sync (sampling
    ahead, max_staleness >= 1) are grown with the weights it held, and the next ones with these. Runners
    pick new weights up between two sample() calls, never inside one. Each sync has its own tag: RLlib
    drops a call when a runner already has ``max_requests_in_flight_per_env_runner`` calls of one tag in
    flight, and a runner may have several syncs queued behind its samples."""

    def __init__(self) -> None:
        self._in_flight: list[str] = []  # tags of syncs not yet answered by every runner

    def __call__(
        self,
        learner_group: Any,
        env_runner_group: Any,
        config: Any,
        version: int,
        runner_ids: list[int] | None = None,
        wait: bool = False,
    ) -> None:
        """Send the learners' weights as ``version`` to the remote runners ``runner_ids`` (all: None) and
        the local one; ``wait``: until the remote runners have loaded them."""
        beside = sampler_beside_learner(env_runner_group, config)
        state = learner_group.get_state(
            components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}", inference_only=not beside
        )[COMPONENT_LEARNER]
        state = {
            COMPONENT_RL_MODULE: state[COMPONENT_RL_MODULE],
            WEIGHTS_SEQ_NO: state.get(WEIGHTS_SEQ_NO, 0),
            WEIGHTS_VERSION: version,
        }
        if env_runner_group.num_remote_workers() > 0:
            self._collect_answered(env_runner_group)
            tag = f"treerpo_weights_{version}_{next(_SYNC_IDS)}"
            sent = env_runner_group.foreach_env_runner_async(
                "set_state", tag=tag, kwargs={"state": ray.put(state)}, remote_worker_ids=runner_ids
            )
            healthy = set(env_runner_group.healthy_env_runner_ids())
            expected = len(healthy if runner_ids is None else healthy & set(runner_ids))
            if sent < expected:  # not expected with a tag per sync; trees it would cost are caught as too old
                logger.warning("weight sync %s reached %d of %d env runners", tag, sent, expected)
            self._in_flight.append(tag)
            if wait:
                env_runner_group.fetch_ready_async_reqs(tags=tag, timeout_seconds=None)
        if env_runner_group.local_env_runner is not None:
            env_runner_group.local_env_runner.set_state(state)
        trim_heap()

    def _collect_answered(self, env_runner_group: Any) -> None:
        """Collect the replies of earlier syncs (an error marks its runner unhealthy: RLlib restores it)."""
        for tag in list(self._in_flight):
            env_runner_group.fetch_ready_async_reqs(tags=tag, timeout_seconds=0)
            if env_runner_group.num_in_flight_async_reqs(tag) == 0:
                self._in_flight.remove(tag)
