"""TreeRPOConfig: every TreeRPO knob, typed, documented once (FIELDS), validated by name.

Defaults follow SPEC.md (the paper's values where it gives them). A YAML file in configs/ is a flat mapping of
field names: TreeRPO's own fields below plus any attribute of RLlib's AlgorithmConfig (env, env_config, lr,
num_env_runners, num_learners, seed, ...). Unknown keys and bad values are rejected with the field's name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override


@dataclass(frozen=True)
class Field:
    default: Any
    doc: str
    check: Callable[[Any], str | None]  # returns why the value is bad, or None


def _positive_int(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else "must be a positive integer"


def _non_negative_int(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer >= 0"


def _non_negative(v):
    return None if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else "must be a number >= 0"


def _positive(v):
    return None if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else "must be a number > 0"


def _unit_interval(v):
    return None if isinstance(v, int | float) and 0 < v <= 1 else "must be in (0, 1]"


def _one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def _optional_str(v):
    return None if v is None or (isinstance(v, str) and v) else "must be a non-empty string or null"


def _branching(v):
    if not isinstance(v, list | tuple) or not v:
        return "must be a non-empty list of positive integers, one per tree level"
    if any(_positive_int(x) for x in v):
        return f"every entry must be a positive integer, got {list(v)}"
    return None


def _dict(v):
    return None if isinstance(v, dict) else "must be a mapping"


FIELDS: dict[str, Field] = {
    # --- tree sampling (SPEC.md s.1) ---
    "branching": Field([8, 8, 8], "Children per node at each level; its length is the tree depth D. "
                       "GRPO is [G] with step_tokens as long as a whole response.", _branching),
    "step_tokens": Field(384, "Maximum new tokens of one reasoning step (L_step).", _positive_int),
    "step_delimiter": Field(None, "Optional string that ends a step early (semantic steps, e.g. a newline); "
                            "null cuts steps by token count only, as the paper does.", _optional_str),
    "stop_at_eos": Field(True, "End a branch (a leaf) when the model emits EOS.", lambda v: None if isinstance(
        v, bool) else "must be true or false"),
    "temperature": Field(1.0, "Sampling temperature; the learner divides logits by the same value.", _positive),
    "top_p": Field(1.0, "Nucleus sampling mass.", _unit_interval),
    "top_k": Field(0, "Top-k sampling; 0 disables it.", _non_negative_int),
    "prompts_per_iteration": Field(8, "Prompts (trees) sampled per training iteration across all env runners.",
                                   _positive_int),
    # --- values and advantages (SPEC.md s.2, s.3) ---
    "tau": Field(0.1, "Drop a sibling group whose value std (ddof=1) is below tau.", _non_negative),
    "advantage_std": Field("group", "Advantage denominator: group std, tree-wide std of centred values, or none.",
                           _one_of("group", "tree", "none")),
    "value_estimate": Field("child_mean", "Internal node value: mean of children's values or of leaf rewards.",
                            _one_of("child_mean", "leaf_mean")),
    "advantage_eps": Field(1e-6, "Added to the advantage denominator.", _non_negative),
    # --- objective (SPEC.md s.4) ---
    "clip_eps_low": Field(0.2, "Lower PPO clip range: rho is clipped at 1 - clip_eps_low.", _non_negative),
    "clip_eps_high": Field(0.2, "Upper PPO clip range: rho is clipped at 1 + clip_eps_high.", _non_negative),
    "kl_coef": Field(0.0, "Weight beta of KL(pi_theta || pi_ref); 0 builds no reference model.", _non_negative),
    "kl_estimator": Field("k3", "KL estimator: k1, k2 or k3 (Schulman).", _one_of("k1", "k2", "k3")),
    "loss_agg": Field("token_mean", "token_mean over all target tokens, or seq_mean_token_mean (GRPO).",
                      _one_of("token_mean", "seq_mean_token_mean")),
    "weight_decay": Field(0.0, "AdamW weight decay.", _non_negative),
    # --- model and generation ---
    "model_name_or_path": Field(None, "Hugging Face model folder or hub name (loaded with from_pretrained). "
                                "null: `treerpo train` builds and warm-starts the tiny model (tiny_model, "
                                "warmstart).", _optional_str),
    "dtype": Field("float32", "Model weights dtype.", _one_of("float32", "bfloat16")),
    "backend": Field("hf", "Generation backend on the env runners.", _one_of("hf", "vllm")),
    "chat_template": Field(False, "Wrap each env prompt with the tokenizer's chat template as a user message "
                           "(plus the generation prompt); for instruct models (rllib_treerpo/prompts.py).",
                           lambda v: None if isinstance(v, bool) else "must be true or false"),
    "system_prompt": Field(None, "Optional system message: a system turn with chat_template, otherwise "
                           "prepended to every prompt followed by a newline.", _optional_str),
    # --- the `treerpo train` job ---
    "algorithm": Field("TreeRPO", "Which algorithm `treerpo train` runs: TreeRPO (GRPO is TreeRPO with a depth-1 "
                       "tree) or RLlib's stock PPO on the token-id wrapper of the same env.",
                       _one_of("TreeRPO", "PPO")),
    "iterations": Field(20, "Training iterations run by `treerpo train`.", _positive_int),
    "checkpoint_every": Field(1, "Save a checkpoint every this many iterations (0: only at the end).",
                              _non_negative_int),
    "eval_problems": Field(200, "Held-out problems evaluated before and after training (0 disables).",
                           _non_negative_int),
    "eval_samples": Field(4, "Sampled responses per held-out problem for pass@1 (plus one greedy).",
                          _positive_int),
    "eval_env_config": Field({"split": "test"}, "env_config overrides for the held-out evaluation env "
                             "(the arithmetic env's test split is disjoint from its train split).", _dict),
    "tiny_model": Field({}, "Architecture of the tiny model built when model_name_or_path is null: any of "
                        "hidden_size, num_layers, num_heads, intermediate_size, max_positions.", _dict),
    "warmstart": Field({}, "Supervised warm start of the tiny model on the env's demonstrations: any of "
                       "steps, batch_size, lr, error_rate, demos, seed.", _dict),
}


class TreeRPOConfig(AlgorithmConfig):
    """Configuration of the TreeRPO algorithm: :data:`FIELDS` plus RLlib's AlgorithmConfig."""

    def __init__(self, algo_class=None):
        from rllib_treerpo.algorithm import TreeRPO
        from rllib_treerpo.env_runner import TreeEnvRunner

        super().__init__(algo_class=algo_class or TreeRPO)
        for name, field in FIELDS.items():
            value = field.default
            setattr(self, name, list(value) if isinstance(value, list) else dict(value) if isinstance(
                value, dict) else value)
        # RLlib settings that TreeRPO needs: trees are grown by our env runner, connectors are not used.
        self.env_runner_cls = TreeEnvRunner
        self.env = "treerpo/Arithmetic-v0"
        self.lr = 1e-6
        self.grad_clip = 1.0
        self.grad_clip_by = "global_norm"
        self.num_epochs = 1
        self.minibatch_size = None  # None: the whole batch in one step
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False

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
        super().validate()
        self.validate_fields()

    def validate_fields(self) -> None:
        """TreeRPO's own checks; raises ValueError naming the first bad field."""
        for name, field in FIELDS.items():
            why = field.check(getattr(self, name))
            if why:
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")
        if self.step_delimiter is not None and self.step_delimiter == "":
            raise ValueError("config field 'step_delimiter': must not be empty")
        if self.minibatch_size is not None and _positive_int(self.minibatch_size):
            raise ValueError(f"config field 'minibatch_size' = {self.minibatch_size!r}: must be a positive integer")
        if _positive_int(self.num_epochs):
            raise ValueError(f"config field 'num_epochs' = {self.num_epochs!r}: must be a positive integer")

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_treerpo.rl_module import CausalLMModule

        return RLModuleSpec(module_class=CausalLMModule, model_config=self.module_model_config())

    def module_model_config(self) -> dict:
        return {"model_name_or_path": self.model_name_or_path, "dtype": self.dtype}

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from rllib_treerpo.learner import TreeRPOTorchLearner

        return TreeRPOTorchLearner

    # --- flat YAML files ------------------------------------------------------------------
    def update_from_flat_dict(self, values: dict[str, Any], *, source: str = "config") -> TreeRPOConfig:
        """Set fields from a flat mapping; an unknown key is an error naming it (and close matches)."""
        known = set(FIELDS) | {k for k in vars(self) if not k.startswith("_")}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"{source}: unknown config field {key!r}{hint}")
            setattr(self, key, value)
        return self

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TreeRPOConfig:
        """Defaults, then the YAML file's fields, then ``overrides``; validated."""
        import yaml

        config = cls()
        if path is not None:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
            values.pop("sweep", None)  # a sweep section is read by `treerpo sweep`
            config.update_from_flat_dict(values, source=str(path))
        config.update_from_flat_dict(overrides or {}, source="--set")
        config.validate_fields()
        return config

    def to_flat_dict(self) -> dict[str, Any]:
        """The resolved TreeRPO fields plus the RLlib fields a run depends on (for the output folder)."""
        out = {name: getattr(self, name) for name in FIELDS}
        for name in ("env", "env_config", "seed", "lr", "grad_clip", "num_epochs", "minibatch_size",
                     "num_env_runners", "num_learners", "num_gpus_per_learner"):
            out[name] = getattr(self, name)
        return out
