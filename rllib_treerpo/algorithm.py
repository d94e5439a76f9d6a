"""TreeRPO as an RLlib Algorithm: sample trees -> advantages and rows -> learner update -> weight sync.

training_step reads like the loop it is (SPEC.md s.1-s.4); each stage is timed through the MetricsLogger.
"""

from __future__ import annotations

import time

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from rllib_treerpo.batch import build_training_batch
from rllib_treerpo.config import TreeRPOConfig


class TreeRPO(Algorithm):
    """Tree Relative Policy Optimization (arXiv 2506.05183) on RLlib's new API stack."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> TreeRPOConfig:
        return TreeRPOConfig()

    @override(Algorithm)
    def training_step(self) -> None:
        c = self.config
        start = time.perf_counter()
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            trees, runner_metrics = self._sample_trees()
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        sample_seconds = time.perf_counter() - start

        rows, tree_metrics = build_training_batch(
            trees, tau=c.tau, advantage_std=c.advantage_std, value_estimate=c.value_estimate,
            eps=c.advantage_eps, pad_id=self._pad_id())
        for key, value in tree_metrics.items():
            self.metrics.log_value(key, value, window=1)
        # Tune's and RLlib's usual headline metric: the mean leaf reward of this iteration.
        self.metrics.log_value((ENV_RUNNER_RESULTS, "episode_return_mean"), tree_metrics["reward/mean"], window=1)

        start = time.perf_counter()
        if len(rows["input_ids"]):  # every group may have been filtered out (e.g. all leaves equal)
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                learner_results = self.learner_group.update(
                    batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(rows)}, env_steps=len(rows["input_ids"])),
                    timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)},
                    num_epochs=c.num_epochs, minibatch_size=c.minibatch_size, shuffle_batch_per_epoch=True,
                )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        learn_seconds = time.perf_counter() - start

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               inference_only=True)

        self.metrics.log_value("perf/sample_seconds", sample_seconds, window=1)
        self.metrics.log_value("perf/learn_seconds", learn_seconds, window=1)
        self.metrics.log_value("perf/decode_tokens_per_s",
                               tree_metrics["tree/generated_tokens"] / max(sample_seconds, 1e-9), window=1)
        self.metrics.log_value("perf/learner_tokens_per_s",
                               float(rows["attention_mask"].sum()) / max(learn_seconds, 1e-9), window=1)
        self.metrics.log_value("perf/generated_tokens_lifetime", tree_metrics["tree/generated_tokens"],
                               reduce="lifetime_sum")
        self.metrics.log_value("perf/prompts_lifetime", tree_metrics["tree/trees"], reduce="lifetime_sum")

    def _sample_trees(self):
        """Each env runner grows its share of prompts_per_iteration trees (in parallel when remote)."""
        group = self.env_runner_group
        remote = group.num_remote_workers() > 0
        results = group.foreach_env_runner(
            lambda runner: (runner.sample(), runner.get_metrics()),
            local_env_runner=not remote,
        )
        trees = [tree for runner_trees, _ in results for tree in runner_trees]
        return trees, [metrics for _, metrics in results]

    def _pad_id(self) -> int:
        if not hasattr(self, "_cached_pad_id"):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.config.model_name_or_path)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            self._cached_pad_id = int(pad if pad is not None else 0)
        return self._cached_pad_id


