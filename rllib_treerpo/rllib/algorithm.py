"""TreeRPOConfig and TreeRPO: the algorithm on RLlib's new API stack, in one file like RLlib's PPOConfig and PPO.

training_step reads like the loop it is (SPEC.md s.1-s.4): sample trees -> advantages and rows -> learner update ->
weight sync, each stage timed through the MetricsLogger. The config carries TreeRPO's own fields
(:data:`rllib_treerpo.settings.FIELDS`, documented there once) beside RLlib's AlgorithmConfig attributes (env,
env_config, lr, num_env_runners, num_learners, seed, ...); unknown keys and bad values are rejected by name.
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
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
from ray.util import log_once

from rllib_treerpo.config_files import coerce_numbers, read_config_file, split_fields
from rllib_treerpo.iteration import minibatch_seed, minibatches, training_packs
from rllib_treerpo.model_io import load_tokenizer, pad_token_id
from rllib_treerpo.precision import resolve_config_dtype
from rllib_treerpo.rllib.weight_sync import free_sampler_for_update, sync_weights
from rllib_treerpo.sampler import TreeSpec
from rllib_treerpo.settings import FIELDS, JOB_FIELDS, RLLIB_FIELD_CHECKS, check_fields, default_value

# RLlib fields a TreeRPO run depends on: written to a run folder's config.yaml beside FIELDS.
RLLIB_FIELDS = (
    "env",
    "env_config",
    "seed",
    "lr",
    "grad_clip",
    "num_epochs",
    "minibatch_size",
    "num_env_runners",
    "num_learners",
    "num_gpus_per_learner",
    "num_gpus_per_env_runner",
    "create_local_env_runner",
)


class TreeRPOConfig(AlgorithmConfig):
    """Configuration of the TreeRPO algorithm: :data:`~rllib_treerpo.settings.FIELDS` plus RLlib's AlgorithmConfig."""

    def __init__(self, algo_class=None):
        from rllib_treerpo.rllib.env_runner import TreeEnvRunner

        super().__init__(algo_class=algo_class or TreeRPO)
        # TreeRPO exists only on RLlib's new API stack: its one-time notice that the new stack is now the default is
        # noise in our users' logs, so it is marked as already shown.
        log_once(f"{self.algo_class.__name__}_on_new_api_stack")
        for name, field in FIELDS.items():
            setattr(self, name, default_value(field))
        # RLlib settings that TreeRPO needs: trees are grown by our env runner, connectors are not used.
        self.env_runner_cls = TreeEnvRunner
        # The embedded CPU default (configs/tiny_arith.yaml): 3-step arithmetic (the env's defaults), lr 3e-5.
        self.env = "treerpo/Arithmetic-v0"
        self.env_config = {}
        self.seed = 0
        self.lr = 3e-5
        self.grad_clip = 1.0
        self.grad_clip_by = "global_norm"
        self.num_epochs = 1
        self.minibatch_size = None  # RLlib's rows per minibatch: TreeRPO plans by num_minibatches instead
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False
        # null: a local env runner only when it is the one that samples (num_env_runners 0). Beside remote runners it
        # would hold one more copy of the model on the driver and load every weight sync; restarted runners take
        # their state from the learners instead (Algorithm.restore_env_runners).
        self.create_local_env_runner = None
        # An exception in an env runner: RLlib sleeps this long before the runner exits (and is restarted), while the
        # iteration waits for it; RLlib's 60 s stalls the iteration. A killed runner is restarted at once anyway.
        self.delay_between_env_runner_restarts_s = 1.0

    @override(AlgorithmConfig)
    def training(self, **kwargs) -> TreeRPOConfig:
        """Sets TreeRPO fields (see FIELDS) and any of AlgorithmConfig.training's arguments."""
        for name in list(kwargs):
            if name in FIELDS:
                value = kwargs.pop(name)
                if value is not NotProvided:
                    setattr(self, name, value)
        super().training(**kwargs)
        return self

    @override(AlgorithmConfig)
    def validate(self) -> None:
        """:meth:`check` then, when ``model_name_or_path`` is null, the embedded default model (built and
        warm-started once, cached): so ``TreeRPOConfig().build_algo()`` and ``tune.run("TreeRPO", config={...})``
        run with no model given."""
        self.check()
        if self.model_name_or_path is None:
            from rllib_treerpo.warmstart import embedded_model

            self.model_name_or_path = embedded_model(self.env, self.env_config)

    def check(self, eval_env_config: dict | None = None, tiny_model: dict | None = None) -> None:
        """Everything that can fail before expensive work (a warm start, a model load, Ray): TreeRPO's and RLlib's
        fields (ours first: one line naming the field), RLlib's checks, the backend's package, the model path and
        the run checks of preflight.py (env, window, depth)."""
        from rllib_treerpo.preflight import preflight

        if self.create_local_env_runner is None:
            self.create_local_env_runner = self.num_env_runners == 0
        self.validate_fields()
        resolve_config_dtype(self)  # dtype auto -> float32 or bfloat16 for this placement, printed with why
        super().validate()
        self.check_treerpo_batching()
        self.check_backend_installed()  # before the algorithm starts a runner, let alone loads a model
        self.check_model_path()
        needed = preflight(
            self,
            eval_env_config,
            default_value(JOB_FIELDS["tiny_model"]) if tiny_model is None else tiny_model,
        )
        if self.backend == "vllm":
            from rllib_treerpo.generation.vllm_engine import check_config

            check_config(self, needed)  # max_model_len null -> what the run needs; the CPU memory check

    def check_model_path(self) -> None:
        """A local model path that cannot be a model is one line here, on the driver (Tune validates a trial's
        config in TreeRPO.default_resource_request before it starts the trial's actor), not an actor traceback.
        On a cluster of several nodes the path may exist on other nodes only: not checked."""
        import ray

        from rllib_treerpo.model_io import check_model_path

        if not (ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1):
            check_model_path(self.model_name_or_path)

    def validate_fields(self) -> None:
        """TreeRPO's own checks; raises ValueError naming the first bad field.

        Only what a config file can get wrong: whether this machine can run the backend is
        :meth:`check_backend_installed` (a vllm config must load and validate where vllm is not installed)."""
        check_fields({name: getattr(self, name) for name in RLLIB_FIELD_CHECKS}, RLLIB_FIELD_CHECKS)
        check_fields({name: getattr(self, name) for name in FIELDS}, FIELDS)

        if self.create_local_env_runner is False and self.num_env_runners == 0 and not self.in_evaluation:
            raise ValueError(
                "config field 'create_local_env_runner' = False: with num_env_runners 0 the local env runner is the "
                "only one that grows trees (null: a local runner only when num_env_runners is 0)"
            )
        if self.tis_cap is not None and (self.num_minibatches != 1 or self.num_epochs != 1):
            raise ValueError(
                f"config field 'tis_cap' = {self.tis_cap!r}: needs one optimizer step per iteration "
                "(num_minibatches: 1, num_epochs: 1): the learner's log-probs of the sampling policy are only "
                "known before the iteration's first step"
            )
        if self.backend == "vllm":
            self._validate_vllm_fields()

    def check_treerpo_batching(self) -> None:
        """TreeRPO plans its minibatches by loss tokens (num_minibatches); RLlib's row count does not apply."""
        if self.minibatch_size is not None:
            raise ValueError(
                f"config field 'minibatch_size' = {self.minibatch_size!r}: TreeRPO does not use RLlib's rows per "
                "minibatch (a tree batch's row count depends on its shape); set num_minibatches (optimizer steps "
                "per epoch) instead"
            )

    def _validate_vllm_fields(self) -> None:
        from rllib_treerpo.generation.vllm import sampling_problem

        problem = sampling_problem(self.temperature, self.top_p, self.top_k)
        if problem:
            raise ValueError(f"config field 'backend' = 'vllm': {problem}")
        if self.num_env_runners > 0 and self.create_local_env_runner:
            raise ValueError(
                "config field 'create_local_env_runner' = True: with remote vllm env runners set it to false, or "
                "the driver builds an engine of its own on a GPU"
            )

    def check_backend_installed(self) -> None:
        """ImportError naming the optional extra when the chosen backend's package is missing (cheap: no import)."""
        if self.backend == "vllm":
            from rllib_treerpo.generation.vllm import require_vllm

            require_vllm()

    def backend_kwargs(self) -> dict[str, Any]:
        """What ``from_pretrained`` of the chosen backend takes from this config, beyond the model and dtype."""
        if self.backend == "vllm":
            return {
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "max_model_len": self.max_model_len,
                "enable_sleep_mode": self.enable_sleep_mode,
                "enforce_eager": self.enforce_eager,
                "seed": self.seed or 0,
            }
        # Inside a Ray actor given a GPU, "cuda" is that GPU (Ray sets CUDA_VISIBLE_DEVICES).
        device = {"device": "cuda"} if self.num_gpus_per_env_runner else {}
        return {"max_batch": self.generation_batch, **device}

    def tree_spec(self, seed: int | None = None) -> TreeSpec:
        """The sampling settings (SPEC.md s.1) as the sampler's validated :class:`TreeSpec`."""
        return TreeSpec(
            tuple(self.branching),
            self.step_tokens,
            self.step_delimiter,
            self.temperature,
            self.top_p,
            self.top_k,
            self.stop_at_eos,
            seed,
        )

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_treerpo.rllib.rl_module import CausalLMModule

        return RLModuleSpec(module_class=CausalLMModule, model_config=self.module_model_config())

    def module_model_config(self) -> dict:
        return {
            "model_name_or_path": self.model_name_or_path,
            "dtype": resolve_config_dtype(self, announce=None),  # resolved already unless built without check
            "mixed_precision": self.mixed_precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "pack_attention": self.pack_attention,
            "temperature": self.temperature,
            "logits_chunk": self.logits_chunk,
        }

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from rllib_treerpo.rllib.learner import TreeRPOTorchLearner

        return TreeRPOTorchLearner

    # --- flat mappings (YAML files) ------------------------------------------------------------
    def known_fields(self) -> list[str]:
        """TreeRPO's fields plus every public RLlib AlgorithmConfig attribute."""
        return sorted(set(FIELDS) | {k for k in vars(self) if not k.startswith("_")})

    def update_from_flat_dict(self, values: dict[str, Any], *, source: str = "config") -> TreeRPOConfig:
        """Set fields from a flat mapping; an unknown key is an error naming it (and close matches)."""
        known = set(self.known_fields())
        for key, value in coerce_numbers(values, {**FIELDS, **RLLIB_FIELD_CHECKS}).items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"{source}: unknown config field {key!r}{hint}")
            setattr(self, key, value)
        return self

    @classmethod
    def from_flat_dict(cls, values: dict[str, Any] | None = None, *, source: str = "config") -> TreeRPOConfig:
        """Defaults, then ``values``; validated (TreeRPO's fields)."""
        config = cls().update_from_flat_dict(dict(values or {}), source=source)
        config.validate_fields()
        return config

    @classmethod
    def from_yaml(
        cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> TreeRPOConfig:
        """Defaults, then the algorithm fields of a flat config file, then those of ``overrides``; validated.

        Job fields (``settings.JOB_FIELDS``) and sections (``sweep:``, ``ppo:``) are left out: they are the job's
        (:func:`rllib_treerpo.jobs.config.load_run_config` reads both parts)."""
        config = cls()
        for source, values in (
            (str(path), read_config_file(path) if path is not None else {}),
            ("--set", dict(overrides or {})),
        ):
            config.update_from_flat_dict(split_fields(values)[0], source=source)
        config.validate_fields()
        return config

    def to_flat_dict(self) -> dict[str, Any]:
        """The resolved TreeRPO fields plus the RLlib fields a run depends on (for the output folder)."""
        return {name: getattr(self, name) for name in (*FIELDS, *RLLIB_FIELDS)}


class TreeRPO(Algorithm):
    """Tree Relative Policy Optimization (arXiv 2506.05183) on RLlib's new API stack."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> TreeRPOConfig:
        return TreeRPOConfig()

    @override(Algorithm)
    def training_step(self) -> None:
        c = self.config
        start, cpu = time.perf_counter(), time.process_time()
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            trees, runner_metrics = self._sample_trees()
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        sample_seconds, cpu_seconds = time.perf_counter() - start, {"sample_cpu": time.process_time() - cpu}

        self.last_trees = trees  # the job saves a few for `treerpo show`
        free_sampler_for_update(self.env_runner_group, c)
        packs, tree_metrics = training_packs(trees, c)
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
            sync_weights(self.learner_group, self.env_runner_group, c)

        for key, value in {"sample": sample_seconds, "learn": learn_seconds, **cpu_seconds}.items():
            self.metrics.log_value(f"perf/{key}_seconds", value, window=1)  # *_cpu: this process's CPU time
        self.metrics.log_value(
            "perf/decode_tokens_per_s",
            tree_metrics["tree/generated_tokens"] / max(sample_seconds, 1e-9),
            window=1,
        )
        self.metrics.log_value("perf/learner_tokens_per_s", fed / max(learn_seconds, 1e-9), window=1)
        self.metrics.log_value(
            "perf/generated_tokens_lifetime", tree_metrics["tree/generated_tokens"], reduce="lifetime_sum"
        )
        self.metrics.log_value("perf/prompts_lifetime", tree_metrics["tree/trees"], reduce="lifetime_sum")

    def _update(self, packs: list) -> tuple[int, int]:
        """One learner update per planned minibatch (iteration.minibatches: num_minibatches per epoch, every loss
        token once per epoch, shards of equal size per learner); returns the optimizer steps and tokens fed."""
        c = self.config
        if not packs:  # every group may have been filtered out (e.g. all leaves equal)
            return 0, 0
        plan = minibatches(
            packs,
            c,
            self._pad_id(),
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
        """Each env runner grows its share of prompts_per_iteration trees (in parallel when remote); a share lost
        with its runner is grown again on a healthy one with the same seed (rllib/shares.py)."""
        from rllib_treerpo.rllib.shares import sample_shares

        group = self.env_runner_group
        sampled = sample_shares(group, self.config, self.iteration, lambda: self.restore_env_runners(group))
        restarts, self._env_runner_restarts = getattr(self, "_env_runner_restarts", 0), 0
        for name, value in (("env_runner_failures", sampled.failures), ("env_runner_restarts", restarts)):
            self.metrics.log_value(f"perf/{name}", float(value), window=1)
            self.metrics.log_value(f"perf/{name}_lifetime", float(value), reduce="lifetime_sum")
        self.metrics.log_value("perf/resampled_trees", float(sampled.resampled_trees), window=1)
        if sampled.healthy_runners is not None:
            self.metrics.log_value("perf/env_runners_healthy", float(sampled.healthy_runners), window=1)
        return sampled.trees, sampled.runner_metrics

    @override(Algorithm)
    def restore_env_runners(self, env_runner_group) -> list[int]:
        """RLlib's restore (ping restarted runners, set their state: weights and weights version), counted for
        ``perf/env_runner_restarts``."""
        restored = super().restore_env_runners(env_runner_group)
        if env_runner_group is self.env_runner_group:
            self._env_runner_restarts = getattr(self, "_env_runner_restarts", 0) + len(restored)
        return restored

    def _pad_id(self) -> int:
        if not hasattr(self, "_cached_pad_id"):
            self._cached_pad_id = pad_token_id(load_tokenizer(self.config.model_name_or_path))
        return self._cached_pad_id
