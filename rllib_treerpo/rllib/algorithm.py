"""TreeRPO: the algorithm on RLlib's new API stack, like RLlib's PPO (its config: rllib/config.py).

training_step reads like the loop it is (docs/algorithm.md s.1-s.4): sample trees -> advantages and rows ->
learner update -> weight sync, each stage timed through the MetricsLogger. With ``max_staleness`` >= 1 the env
runners grow the next iterations' trees during the update (rllib/pipeline.py). RLlib's evaluation settings
(``evaluation_interval``, ...) evaluate on held-out problems after it (rllib/evaluation.py).
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
    EVALUATION_RESULTS,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from rllib_treerpo.learner.batches import BatchSettings, minibatch_seed, minibatches
from rllib_treerpo.learner.rows import PackSettings, build_training_batch
from rllib_treerpo.models.model_io import load_tokenizer, pad_token_id
from rllib_treerpo.rllib.config import TreeRPOConfig
from rllib_treerpo.rllib.model_files import serve_model_folder
from rllib_treerpo.rllib.pipeline import SamplePipeline, drop_stale, staleness
from rllib_treerpo.rllib.weight_sync import WeightSync, free_sampler_for_update

__all__ = ["TreeRPO", "TreeRPOConfig"]


class TreeRPO(Algorithm):
    """Tree Relative Policy Optimization (arXiv 2506.05183) on RLlib's new API stack."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> TreeRPOConfig:
        return TreeRPOConfig()

    @override(Algorithm)
    def setup(self, config) -> None:
        # env runners restored since the last iteration (restore_env_runners), logged by the next one
        self._env_runner_restarts = 0
        self._evaluation: dict | None = None  # the latest held-out evaluation, carried by every result
        self._stepping = False
        self._pipeline = SamplePipeline()  # shares grown ahead (max_staleness >= 1)
        self._sync_weights = WeightSync()
        # On a cluster: nodes without the model folder get the driver's through the object store.
        self._model_folder_server = serve_model_folder(config.model_name_or_path)
        super().setup(config)
        # the packs' padding id; the config's model is resolved (validated) before setup
        self._pad_token_id = pad_token_id(load_tokenizer(self.config.model_name_or_path))

    @classmethod
    @override(Algorithm)
    def _should_create_evaluation_env_runners(cls, eval_config) -> bool:
        """An evaluation env runner group only for dedicated runners: with evaluation_num_env_runners 0 the
        training runners evaluate (RLlib would build a local evaluation runner: one more model copy)."""
        return eval_config.evaluation_num_env_runners > 0

    @override(Algorithm)
    def step(self) -> dict:
        """RLlib's step (training_step, then evaluate() every evaluation_interval iterations). With an
        interval, the first step also evaluates the starting policy (iteration 0: the curve's start), and
        every result carries the latest evaluation (``evaluation/iteration`` says which), so Tune's metric
        ``evaluation/pass@1`` exists in every result and ASHA and the best-trial choice can read it."""
        if self.config.evaluation_interval and self._evaluation is None:
            self.evaluate()
        self._stepping = True  # evaluate() inside the step measures this iteration's weights (iteration + 1)
        try:
            results = super().step()
        finally:
            self._stepping = False
        if self._evaluation is not None and EVALUATION_RESULTS not in results:
            results[EVALUATION_RESULTS] = dict(self._evaluation)
        return results

    @override(Algorithm)
    def evaluate(self, parallel_train_future=None) -> dict:
        """The held-out evaluation of the current policy (rllib/evaluation.py): pass@1, pass@K, greedy
        accuracy, mean response tokens, seconds, iteration; also what the next results carry."""
        from rllib_treerpo.rllib.evaluation import evaluate_held_out

        self._evaluation = evaluate_held_out(self, self.iteration + int(self._stepping))
        return dict(self._evaluation)

    @override(Algorithm)
    def training_step(self) -> None:
        c = self.config
        start, cpu = time.perf_counter(), time.process_time()
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            trees, runner_metrics = self._sample_trees()
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        sample_seconds, cpu_seconds = time.perf_counter() - start, {"sample_cpu": time.process_time() - cpu}

        self.last_trees = trees  # the job saves a few for `treerpo show`
        # The runners grow the next iterations' trees with the weights they hold while the learner trains.
        for ahead in range(self.iteration + 1, self.iteration + 1 + c.max_staleness):
            if ahead not in self._pipeline.iterations_ahead():
                self._pipeline.submit(self.env_runner_group, c, ahead)
        free_sampler_for_update(self.env_runner_group, c)
        packs, tree_metrics = build_training_batch(trees, PackSettings.from_config(c))
        for key, value in tree_metrics.items():
            self.metrics.log_value(key, value, window=1)
        # Tune's and RLlib's usual headline metric: the mean leaf reward of this iteration.
        self.metrics.log_value(
            (ENV_RUNNER_RESULTS, "episode_return_mean"), tree_metrics["reward/mean"], window=1
        )

        start, cpu = time.perf_counter(), time.process_time()
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            steps, fed = self._update(packs)
        learn_seconds, cpu_seconds["learn_cpu"] = time.perf_counter() - start, time.process_time() - cpu
        self.metrics.log_value("loss/optimizer_steps", float(steps), window=1)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self._sync_weights(self.learner_group, self.env_runner_group, c, version=self.iteration + 1)

        # sample: what the learner waited for trees (also perf/learner_wait_seconds); *_cpu: this process
        timed = {"sample": sample_seconds, "learner_wait": sample_seconds, "learn": learn_seconds}
        for key, value in {**timed, **cpu_seconds}.items():
            self.metrics.log_value(f"perf/{key}_seconds", value, window=1)
        self.metrics.log_value("perf/learner_tokens_per_s", fed / max(learn_seconds, 1e-9), window=1)
        self.metrics.log_value(
            "perf/generated_tokens_lifetime", tree_metrics["tree/generated_tokens"], reduce="lifetime_sum"
        )
        self.metrics.log_value("perf/prompts_lifetime", tree_metrics["tree/trees"], reduce="lifetime_sum")

    def _update(self, packs: list) -> tuple[int, int]:
        """One learner update per planned minibatch (batches.minibatches: num_minibatches per epoch, every
        loss token once per epoch, shards of equal size per learner); returns the optimizer steps and tokens
        fed."""
        c = self.config
        if not packs:  # every group may have been filtered out (e.g. all leaves equal)
            return 0, 0
        plan = minibatches(
            packs,
            BatchSettings.from_config(c),
            self._pad_token_id,
            seed=minibatch_seed(c.seed, self.iteration),
            num_learners=max(1, c.num_learners),
        )
        lifetime = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        for batch in plan:
            results = self.learner_group.update(
                batch=MultiAgentBatch(
                    {DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=len(batch["input_ids"])
                ),
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime},
            )
            self.metrics.aggregate(results, key=LEARNER_RESULTS)
        return len(plan), sum(len(p.input_ids) for p in packs) * c.num_epochs

    def _sample_trees(self):
        """Each env runner grows its share of prompts_per_iteration trees (in parallel when remote); a share
        lost with its runner is grown again on a healthy one with the same seed (rllib/shares.py). Shares
        grown ahead (max_staleness >= 1) are collected first; those too old are dropped and grown again with
        the current weights (rllib/pipeline.py)."""
        from rllib_treerpo.rllib.shares import sample_shares

        c, group, version = self.config, self.env_runner_group, self.iteration
        ahead = self._pipeline.collect(group, self.iteration)
        done, dropped = drop_stale(ahead.done, version, c.max_staleness)
        if dropped:  # a runner missed a sync: it gets the current weights before it grows its share again
            self._sync_weights(self.learner_group, group, c, version=version, wait=True)
        sampled = sample_shares(group, c, self.iteration, lambda: self.restore_env_runners(group), done)
        sampled.failures += len({runner for runner, _ in ahead.lost.values()})
        sampled.resampled_trees += sum(prompts for _, prompts in ahead.lost.values())
        self._log_pipeline(sampled, dropped, version)
        restarts = self._env_runner_restarts
        self._env_runner_restarts = 0
        for name, value in (("env_runner_failures", sampled.failures), ("env_runner_restarts", restarts)):
            self.metrics.log_value(f"perf/{name}", float(value), window=1)
            self.metrics.log_value(f"perf/{name}_lifetime", float(value), reduce="lifetime_sum")
        self.metrics.log_value("perf/resampled_trees", float(sampled.resampled_trees), window=1)
        if sampled.healthy_runners is not None:
            self.metrics.log_value("perf/env_runners_healthy", float(sampled.healthy_runners), window=1)
        return sampled.trees, sampled.runner_metrics

    def _log_pipeline(self, sampled, dropped: int, version: int) -> None:
        """Who waited for whom, and how old the trees are (perf/*: docs/fields.md, max_staleness)."""
        ages = staleness(sampled.trees, version) or [0]
        generated = sum(len(n.token_ids) for t in sampled.trees for n in t.nodes[1:])
        values = {
            "sampler_wait_seconds": sum(sampled.wait_seconds) / max(len(sampled.wait_seconds), 1),
            "staleness_mean": sum(ages) / len(ages),
            "staleness_max": max(ages),
            "dropped_stale_trees": dropped,
            # the runners' own decode rate: their generated tokens over the longest share's sampling time
            "decode_tokens_per_s": generated / max(max(sampled.sample_seconds, default=0.0), 1e-9),
        }
        for key, value in values.items():
            self.metrics.log_value(f"perf/{key}", float(value), window=1)
        self.metrics.log_value("perf/dropped_stale_trees_lifetime", float(dropped), reduce="lifetime_sum")

    @override(Algorithm)
    def restore_env_runners(self, env_runner_group) -> list[int]:
        """RLlib's restore (ping restarted runners, set their state: the learners' weights), counted for
        ``perf/env_runner_restarts``; the restored runners learn the weights' version (RLlib sends none). It
        runs outside the update, when the learners hold version ``iteration``."""
        restored = super().restore_env_runners(env_runner_group)
        if env_runner_group is self.env_runner_group:
            self._env_runner_restarts += len(restored)
        if restored:
            version = self.iteration
            env_runner_group.foreach_env_runner(
                lambda runner: runner.set_weights_version(version),
                remote_worker_ids=restored,
                local_env_runner=False,
            )
        return restored

    @override(Algorithm)
    def set_state(self, state) -> None:
        """RLlib's restore of a checkpoint (it syncs the restored weights to the runners), plus their version;
        shares in flight were grown for another run's weights: dropped (rllib/pipeline.py)."""
        super().set_state(state)
        self._pipeline.discard()
        version = self.iteration
        self.env_runner_group.foreach_env_runner(
            lambda runner: runner.set_weights_version(version), local_env_runner=True
        )
