"""The policy's weights from the learners to the env runners; the sampler's copy out of the update's way.

When the local env runner samples and the local learner updates in one process (num_env_runners 0,
num_learners 0: the laptop setup), the two copies of the model never need to be in memory at the same peak:
the sampler's copy (in ``dtype``) is freed once the trees are grown (GenerationBackend.drop_weights) and
refilled by the weight sync after the update, straight from the learner's master tensors (no cast copy: the
sampler casts as it copies), so the update's peak (gradients next to the float32 masters and AdamW state)
has no sampler's copy beside it (docs/real_models.md s.8).
"""

from __future__ import annotations

from typing import Any

from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE

from rllib_treerpo.learner.memory import trim_heap


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


def sync_weights(learner_group: Any, env_runner_group: Any, config: Any) -> None:
    """The learners' weights to the env runners, in the sampler's dtype.

    With no remote runner the local one takes them directly: RLlib's EnvRunnerGroup.sync_weights ray.put()s
    the state even then, and the object store's pages it touched would stay in the driver's resident memory.
    From a learner in this process the master tensors themselves go, as views."""
    if env_runner_group.num_remote_workers() == 0 and env_runner_group.local_env_runner is not None:
        state = learner_group.get_state(
            components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}",
            inference_only=not sampler_beside_learner(env_runner_group, config),
        )[COMPONENT_LEARNER]
        env_runner_group.local_env_runner.set_state(state)
    else:
        env_runner_group.sync_weights(from_worker_or_learner_group=learner_group, inference_only=True)
    trim_heap()
