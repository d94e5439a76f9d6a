"""TreeRPOConfig: TreeRPO's settings on RLlib's AlgorithmConfig, like RLlib's PPOConfig.

The fields are declared once, typed and documented, in :mod:`rllib_treerpo.config.settings`
(``TreeRPOSettings``, which this class inherits, and ``RLlibSettings``: the RLlib attributes at TreeRPO's
defaults). Checks come in three nested steps:

- :meth:`TreeRPOConfig.check_values`: every value, pure (loaders run it: a vllm config loads where vllm is not
  installed);
- :meth:`TreeRPOConfig.preflight`: the values, RLlib's own checks, then the run against this machine
  (:func:`rllib_treerpo.config.preflight.preflight`: the backend's package, the model, the env, the window),
  before anything expensive;
- :meth:`TreeRPOConfig.validate`: RLlib's hook before it builds the algorithm: the preflight, then the
  embedded default model when no model is given.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.util import log_once

from rllib_treerpo.config.checks import check_fields
from rllib_treerpo.config.config_files import coerce_numbers, load_config
from rllib_treerpo.config.settings import (
    FIELDS,
    JOB_FIELDS,
    RLLIB_FIELD_CHECKS,
    RLlibSettings,
    TreeRPOSettings,
    set_defaults,
)
from rllib_treerpo.learner.precision import resolve_config_dtype
from rllib_treerpo.sampling.sampler import TreeSpec

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
    "evaluation_num_env_runners",
    "custom_resources_per_env_runner",
    "custom_resources_per_learner",
)


class TreeRPOConfig(AlgorithmConfig, TreeRPOSettings):
    """Configuration of the TreeRPO algorithm: :class:`~rllib_treerpo.config.settings.TreeRPOSettings` plus
    RLlib's AlgorithmConfig."""

    def __init__(self, algo_class=None):
        from rllib_treerpo.rllib.algorithm import TreeRPO
        from rllib_treerpo.rllib.env_runner import TreeEnvRunner

        super().__init__(algo_class=algo_class or TreeRPO)
        # TreeRPO exists only on RLlib's new API stack: its one-time notice that the new stack is now the
        # default is noise in our users' logs, so it is marked as already shown.
        log_once(f"{self.algo_class.__name__}_on_new_api_stack")
        set_defaults(self, TreeRPOSettings)
        set_defaults(self, RLlibSettings)
        # Trees are grown by our env runner; RLlib's connectors and env-runner states are not used.
        self.env_runner_cls = TreeEnvRunner
        self.grad_clip_by = "global_norm"
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        branching: list[int] = NotProvided,
        step_tokens: int = NotProvided,
        step_delimiter: str | None = NotProvided,
        stop_at_eos: bool = NotProvided,
        temperature: float = NotProvided,
        top_p: float = NotProvided,
        top_k: int = NotProvided,
        prompts_per_iteration: int = NotProvided,
        max_staleness: int = NotProvided,
        tau: float = NotProvided,
        advantage_std: str = NotProvided,
        value_estimate: str = NotProvided,
        advantage_eps: float = NotProvided,
        clip_eps_low: float = NotProvided,
        clip_eps_high: float = NotProvided,
        kl_coef: float = NotProvided,
        kl_estimator: str = NotProvided,
        loss_agg: str = NotProvided,
        weight_decay: float = NotProvided,
        packing: bool = NotProvided,
        pack_tokens: int = NotProvided,
        pack_attention: str = NotProvided,
        num_minibatches: int = NotProvided,
        forward_tokens: int | None = NotProvided,
        logits_chunk: int | None = NotProvided,
        model_name_or_path: str | None = NotProvided,
        dtype: str = NotProvided,
        mixed_precision: bool = NotProvided,
        gradient_checkpointing: bool = NotProvided,
        backend: str = NotProvided,
        generation_batch: int | None = NotProvided,
        gpu_memory_utilization: float = NotProvided,
        max_model_len: int | None = NotProvided,
        enforce_eager: bool = NotProvided,
        enable_sleep_mode: bool = NotProvided,
        release_after_sampling: bool = NotProvided,
        tis_cap: float | None = NotProvided,
        chat_template: bool = NotProvided,
        system_prompt: str | None = NotProvided,
        **kwargs,
    ) -> TreeRPOConfig:
        """Sets TreeRPO's fields (documented in settings.TreeRPOSettings) and any of
        AlgorithmConfig.training's arguments (``lr``, ``grad_clip``, ``num_epochs``, ...)."""
        given = {
            name: value for name, value in locals().items() if name in FIELDS and value is not NotProvided
        }
        super().training(**kwargs)
        for name, value in given.items():
            setattr(self, name, value)
        return self

    @override(AlgorithmConfig)
    def evaluation(self, *, evaluation_samples: int = NotProvided, **kwargs) -> TreeRPOConfig:
        """RLlib's evaluation settings (``evaluation_interval``, ``evaluation_duration`` in held-out problems,
        ``evaluation_num_env_runners``, ``evaluation_config``) plus TreeRPO's ``evaluation_samples`` (sampled
        responses per held-out problem); what TreeRPO.evaluate reads (rllib/evaluation.py)."""
        super().evaluation(**kwargs)
        if evaluation_samples is not NotProvided:
            self.evaluation_samples = evaluation_samples
        return self

    @override(AlgorithmConfig)
    def get_evaluation_config_object(self) -> TreeRPOConfig | None:
        """RLlib's evaluation config (this config updated with ``evaluation_config``), except: its env_config
        is the training env_config with the overrides' merged over it (RLlib replaces it whole, which would
        lose e.g. the task's difficulty), and dedicated evaluation runners are remote only. With evaluation
        off it evaluates nothing and keeps the training env, so an override for a split the env lacks
        cannot fail a run that never evaluates."""
        eval_config = super().get_evaluation_config_object()
        if eval_config is None:
            return None
        overrides = self.evaluation_config if isinstance(self.evaluation_config, dict) else {}
        evaluating = bool(self.evaluation_interval or self.evaluation_num_env_runners)
        env_overrides = overrides.get("env_config") or {} if evaluating else {}
        eval_config.env_config = {**self.env_config, **env_overrides}
        eval_config.create_local_env_runner = eval_config.num_env_runners == 0
        return eval_config

    # --- checks ---------------------------------------------------------------------------------------------
    def check_values(self, algorithm: str = "TreeRPO") -> None:
        """Every value a config can get wrong, one ValueError naming the first bad field: RLlib's attributes
        and TreeRPO's one by one, then the rules between them. Pure: nothing is imported, read or started.

        ``algorithm``: the job that reads these fields ("PPO": RLlib's minibatch_size is the PPO baseline's
        own)."""
        check_fields({name: getattr(self, name) for name in RLLIB_FIELD_CHECKS}, RLLIB_FIELD_CHECKS)
        check_fields({name: getattr(self, name) for name in FIELDS}, FIELDS)
        if self.create_local_env_runner is False and self.num_env_runners == 0 and not self.in_evaluation:
            raise ValueError(
                "config field 'create_local_env_runner' = False: with num_env_runners 0 the local env runner "
                "is the only one that grows trees (null: a local runner only when num_env_runners is 0)"
            )
        if self.tis_cap is not None and (self.num_minibatches != 1 or self.num_epochs != 1):
            raise ValueError(
                f"config field 'tis_cap' = {self.tis_cap!r}: needs one optimizer step per iteration "
                "(num_minibatches: 1, num_epochs: 1): the learner's log-probs of the sampling policy are "
                "only known before the iteration's first step"
            )
        if self.max_staleness and self.num_env_runners == 0 and not self.in_evaluation:
            raise ValueError(
                f"config field 'max_staleness' = {self.max_staleness!r}: sampling ahead of the learner needs "
                "remote env runners (num_env_runners >= 1); with 0 the driver samples between updates"
            )
        if self.max_staleness and self.release_after_sampling:
            raise ValueError(
                f"config field 'max_staleness' = {self.max_staleness!r}: release_after_sampling frees the "
                "runners' device for the learner between samples, and sampling ahead would keep them on it "
                "while the learner trains; set one of the two off"
            )
        if self.backend == "vllm":
            self._check_vllm_values()
        if algorithm == "TreeRPO" and self.minibatch_size is not None:
            raise ValueError(
                f"config field 'minibatch_size' = {self.minibatch_size!r}: TreeRPO does not use RLlib's "
                "rows per minibatch (a tree batch's row count depends on its shape); set num_minibatches "
                "(optimizer steps per epoch) instead"
            )

    def _check_vllm_values(self) -> None:
        from rllib_treerpo.generation.vllm import sampling_problem

        problem = sampling_problem(self.temperature, self.top_p, self.top_k)
        if problem:
            raise ValueError(f"config field 'backend' = 'vllm': {problem}")
        if self.num_env_runners > 0 and self.create_local_env_runner:
            raise ValueError(
                "config field 'create_local_env_runner' = True: with remote vllm env runners set it to "
                "false, or the driver builds an engine of its own on a GPU"
            )

    def preflight(self, eval_env_config: dict | None = None, tiny_model: dict | None = None) -> None:
        """Everything that can fail before expensive work (a warm start, a model load, Ray):
        :meth:`check_values` (TreeRPO's first: one line naming the field), RLlib's own checks, then the run on
        this machine (preflight.py). ``eval_env_config``, ``tiny_model``: the job's held-out env and embedded
        model."""
        import ray

        from rllib_treerpo.config.preflight import preflight

        if self.create_local_env_runner is None:
            self.create_local_env_runner = self.num_env_runners == 0
        self.check_values()
        resolve_config_dtype(self)  # dtype auto -> float32 or bfloat16 for this placement, printed with why
        super().validate()
        # Tune validates a trial's config on the driver (TreeRPO.default_resource_request) before it starts
        # the trial's actor, so a bad local model path is one line here, not an actor traceback. On a cluster
        # of several nodes the path may exist on other nodes only.
        several_nodes = ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1
        needed = preflight(self, eval_env_config, tiny_model, model_path_is_local=not several_nodes)
        if self.backend == "vllm":
            from rllib_treerpo.generation.vllm_engine import check_config

            check_config(self, needed)  # max_model_len null -> what the run needs; the CPU memory check

    @override(AlgorithmConfig)
    def validate(self) -> None:
        """RLlib's hook before it builds TreeRPO (build_algo(), every Tune trial): :meth:`preflight`, then,
        when ``model_name_or_path`` is null, the embedded default model (built and warm-started once, cached):
        so ``TreeRPOConfig().build_algo()`` and ``tune.run("TreeRPO", config={...})`` run with no model
        given."""
        self.preflight()
        if self.model_name_or_path is None:
            from rllib_treerpo.models.warmstart import embedded_model

            self.model_name_or_path = embedded_model(self.env, self.env_config)

    # --- what the env runners and the learners read ---------------------------------------------------------
    def backend_kwargs(self) -> dict[str, Any]:
        """What ``from_pretrained`` of the chosen backend takes from this config, beyond the model and
        dtype."""
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
        """The sampling settings (docs/algorithm.md s.1) as the sampler's validated :class:`TreeSpec`."""
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
            "dtype": resolve_config_dtype(
                self, announce=None
            ),  # resolved already unless built without preflight
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

    # --- flat mappings (YAML files) -------------------------------------------------------------------------
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
    def from_yaml(
        cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> TreeRPOConfig:
        """Defaults, then the algorithm fields of a flat config file, then those of ``overrides``; values
        checked.

        Job fields (``settings.JobSettings``) and sections (``sweep:``, ``ppo:``) are left out: they are the
        job's (:func:`rllib_treerpo.jobs.config.load_run_config` reads both parts)."""
        config = cls()
        job, _ = load_config(
            path, overrides, lambda values, source: config.update_from_flat_dict(values, source=source)
        )
        config.check_values(job.get("algorithm", JOB_FIELDS["algorithm"].default))
        return config

    def to_flat_dict(self) -> dict[str, Any]:
        """The resolved TreeRPO fields plus the RLlib fields a run depends on (for the output folder)."""
        return {name: getattr(self, name) for name in (*FIELDS, *RLLIB_FIELDS)}
