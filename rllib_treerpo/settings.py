"""Every setting, typed and documented once: the algorithm's fields and the job's. Pure (no Ray).

``FIELDS`` are TreeRPO's own algorithm settings (SPEC.md; read by the sampler, the advantages and the learner):
:class:`rllib_treerpo.rllib.TreeRPOConfig` carries them beside RLlib's AlgorithmConfig attributes.
``JOB_FIELDS`` belong to the `treerpo train` job (iterations, checkpoints, held-out evaluation, which algorithm, the
embedded model's settings): :class:`rllib_treerpo.jobs.config.JobConfig` carries them. A YAML file in configs/ is
one flat mapping of both; the loader splits it. Each field's check returns why a value is bad, or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    return (
        None if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else "must be a number >= 0"
    )


def _positive(v):
    return (
        None if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else "must be a number > 0"
    )


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


def _bool(v):
    return None if isinstance(v, bool) else "must be true or false"


def _optional_positive_int(v):
    return None if v is None else _positive_int(v)


def _dict(v):
    return None if isinstance(v, dict) else "must be a mapping"


def _bool(v):
    return None if isinstance(v, bool) else "must be true or false"


def _optional(check):
    return lambda v: None if v is None else check(v)


FIELDS: dict[str, Field] = {
    # --- tree sampling (SPEC.md s.1) ---
    "branching": Field(
        [8, 8, 8],
        "Children per node at each level; its length is the tree depth D. "
        "GRPO is [G] with step_tokens as long as a whole response.",
        _branching,
    ),
    "step_tokens": Field(384, "Maximum new tokens of one reasoning step (L_step).", _positive_int),
    "step_delimiter": Field(
        None,
        "Optional string that ends a step early (semantic steps, e.g. a newline); "
        "null cuts steps by token count only, as the paper does.",
        _optional_str,
    ),
    "stop_at_eos": Field(True, "End a branch (a leaf) when the model emits EOS.", _bool),
    "temperature": Field(
        1.0, "Sampling temperature; the learner divides logits by the same value.", _positive
    ),
    "top_p": Field(1.0, "Nucleus sampling mass.", _unit_interval),
    "top_k": Field(0, "Top-k sampling; 0 disables it.", _non_negative_int),
    "prompts_per_iteration": Field(
        8, "Prompts (trees) sampled per training iteration across all env runners.", _positive_int
    ),
    # --- values and advantages (SPEC.md s.2, s.3) ---
    "tau": Field(0.1, "Drop a sibling group whose value std (ddof=1) is below tau.", _non_negative),
    "advantage_std": Field(
        "group",
        "Advantage denominator: group std, tree-wide std of centred values, or none.",
        _one_of("group", "tree", "none"),
    ),
    "value_estimate": Field(
        "child_mean",
        "Internal node value: mean of children's values or of leaf rewards.",
        _one_of("child_mean", "leaf_mean"),
    ),
    "advantage_eps": Field(1e-6, "Added to the advantage denominator.", _non_negative),
    # --- objective (SPEC.md s.4) ---
    "clip_eps_low": Field(0.2, "Lower PPO clip range: rho is clipped at 1 - clip_eps_low.", _non_negative),
    "clip_eps_high": Field(0.2, "Upper PPO clip range: rho is clipped at 1 + clip_eps_high.", _non_negative),
    "kl_coef": Field(
        0.0, "Weight beta of KL(pi_theta || pi_ref); 0 builds no reference model.", _non_negative
    ),
    "kl_estimator": Field("k3", "KL estimator: k1, k2 or k3 (Schulman).", _one_of("k1", "k2", "k3")),
    "loss_agg": Field(
        "token_mean",
        "token_mean over all target tokens, or seq_mean_token_mean (GRPO).",
        _one_of("token_mean", "seq_mean_token_mean"),
    ),
    "weight_decay": Field(0.0, "AdamW weight decay.", _non_negative),
    # --- the learner's layout and batching ---
    "packing": Field(
        True,
        "Tree-packed training: one forward row per subtree, each shared prefix computed once (packing.py); "
        "false: one row per trained node (its whole path), the same log-probs at a higher cost.",
        _bool,
    ),
    "pack_tokens": Field(
        8192,
        "Most tokens of one packed row; a larger subtree is split into its children's subtrees.",
        _positive_int,
    ),
    "pack_attention": Field(
        "segments",
        "Attention inside a pack: segments (each node's tokens against its own path's keys; no masked work, "
        "tree_attention.py) or dense (one L x L tree mask handed to the model's attention, e.g. sdpa or flex).",
        _one_of("segments", "dense"),
    ),
    "num_minibatches": Field(
        4,
        "Optimizer steps per epoch of an iteration: its packs are split into this many minibatches of about "
        "equal loss tokens, whatever the tree shape (fewer when there are fewer packs).",
        _positive_int,
    ),
    "forward_tokens": Field(
        16384,
        "Most tokens (rows x longest row) of one learner forward: a minibatch is split into such micro-batches "
        "whose gradients add up (memory bound; null: one forward per minibatch).",
        _optional_positive_int,
    ),
    # --- model and generation ---
    "model_name_or_path": Field(
        None,
        "Hugging Face model folder or hub name (loaded with from_pretrained). "
        "null: `treerpo train` builds and warm-starts the tiny model (tiny_model, "
        "warmstart).",
        _optional_str,
    ),
    "dtype": Field(
        "float32",
        "Compute dtype: the sampler's weights (env runners, evaluation), the learner's forward and the exported "
        "final_model. bfloat16 halves the sampler's copy; the learner's weights follow mixed_precision.",
        _one_of("float32", "bfloat16"),
    ),
    "mixed_precision": Field(
        True,
        "With dtype bfloat16: the learner keeps float32 master weights and AdamW state and runs its forward under "
        "bf16 autocast (checkpoints hold the float32 masters); false trains the bf16 weights themselves (most "
        "small-lr updates then round to zero). No effect with float32 (rllib_treerpo/precision.py).",
        _bool,
    ),
    "gradient_checkpointing": Field(
        False,
        "Recompute each decoder layer's activations in the backward instead of keeping them: less learner memory "
        "for about one more forward of compute; the same update.",
        _bool,
    ),
    "backend": Field(
        "hf",
        "Generation backend on the env runners: hf (transformers, CPU or GPU) or vllm (GPU only, the optional "
        "extra; docs/vllm.md).",
        _one_of("hf", "vllm"),
    ),
    "generation_batch": Field(
        512,
        "Most sequences the hf backend decodes together: a tree level with more samples is generated in chunks "
        "(memory bound; null: a whole level at once). vLLM batches by itself.",
        _optional_positive_int,
    ),
    "gpu_memory_utilization": Field(
        0.9,
        "vllm backend: fraction of the GPU's memory the engine takes for weights and KV cache; leave room for a "
        "learner on the same GPU.",
        _unit_interval,
    ),
    "max_model_len": Field(
        None,
        "vllm backend: longest context plus response in tokens (sizes the KV cache); null: the model's window.",
        _optional(_positive_int),
    ),
    "enable_sleep_mode": Field(
        False,
        "vllm backend: build the engine with sleep mode, so that release_after_sampling frees its GPU memory "
        "(weights to CPU memory, KV cache dropped) while a learner on the same GPU trains.",
        _bool,
    ),
    "release_after_sampling": Field(
        False,
        "Env runners free their backend's device memory after each sample() (hf: its KV caches; vllm with "
        "enable_sleep_mode: the engine sleeps until the next weight load or sampling).",
        _bool,
    ),
    "tis_cap": Field(
        None,
        "Truncated importance sampling for a sampler whose log-probs differ from the learner's (vllm): each "
        "token's policy-gradient loss is weighted by min(pi_learner / pi_sampler, tis_cap); null: off. Needs "
        "one optimizer step per iteration (minibatch_size null, num_epochs 1).",
        _optional(_positive),
    ),
    "chat_template": Field(
        False,
        "Wrap each env prompt with the tokenizer's chat template as a user message "
        "(plus the generation prompt); for instruct models (rllib_treerpo/prompts.py).",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    "system_prompt": Field(
        None,
        "Optional system message: a system turn with chat_template, otherwise "
        "prepended to every prompt followed by a newline.",
        _optional_str,
    ),
}


JOB_FIELDS: dict[str, Field] = {
    "algorithm": Field(
        "TreeRPO",
        "Which algorithm `treerpo train` runs: TreeRPO (GRPO is TreeRPO with a depth-1 "
        "tree) or RLlib's stock PPO on the token-id wrapper of the same env.",
        _one_of("TreeRPO", "PPO"),
    ),
    "iterations": Field(20, "Training iterations run by `treerpo train`.", _positive_int),
    "checkpoint_every": Field(
        1, "Save a checkpoint every this many iterations (0: only at the end).", _non_negative_int
    ),
    "eval_problems": Field(
        200, "Held-out problems evaluated before and after training (0 disables).", _non_negative_int
    ),
    "eval_samples": Field(
        4, "Sampled responses per held-out problem for pass@1 (plus one greedy).", _positive_int
    ),
    "eval_env_config": Field(
        {"split": "test"},
        "env_config overrides for the held-out evaluation env "
        "(the arithmetic env's test split is disjoint from its train split).",
        _dict,
    ),
    "tiny_model": Field(
        {},
        "Architecture of the tiny model built when model_name_or_path is null: any of "
        "hidden_size, num_layers, num_heads, intermediate_size, max_positions.",
        _dict,
    ),
    "warmstart": Field(
        {},
        "Supervised warm start of the tiny model on the env's demonstrations: any of "
        "steps, batch_size, lr, error_rate, demos, seed.",
        _dict,
    ),
}


def check_fields(values: dict[str, Any], fields: dict[str, Field]) -> None:
    """ValueError naming the first field of ``fields`` whose value in ``values`` is bad."""
    for name, field in fields.items():
        if name in values:
            why = field.check(values[name])
            if why:
                raise ValueError(f"config field {name!r} = {values[name]!r}: {why}")


def default_value(field: Field) -> Any:
    """A fresh copy of a field's default (lists and mappings are never shared between configs)."""
    value = field.default
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


# Sections of a config file that are not fields: read by their own commands (`treerpo sweep`, the PPO baseline).
SECTIONS = ("sweep", "ppo")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing file or a YAML error is one ValueError naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return values


def split_fields(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A flat config mapping -> (algorithm values, job values (JOB_FIELDS), sections (SECTIONS))."""
    algo, job, sections = {}, {}, {}
    for key, value in values.items():
        (job if key in JOB_FIELDS else sections if key in SECTIONS else algo)[key] = value
    return algo, job, sections
