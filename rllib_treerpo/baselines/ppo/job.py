"""The PPO baseline: RLlib's own PPO (PPOConfig / PPO, imported, not copied) on the token-id view of the same
env.

`treerpo train` runs this job for a config with ``algorithm: PPO``. It reads the TreeRPO config fields it
shares:

- task and model: env, env_config, eval_env_config, seed, model_name_or_path (null: the same cached
  warm-started tiny model as TreeRPO, :func:`rllib_treerpo.models.warmstart.embedded_model`), dtype, backend;
- one episode = one width-1 "tree": at most ``len(branching)`` steps of ``step_tokens`` tokens, cut at
  ``step_delimiter`` (so the widths in ``branching`` are ignored), sampled at temperature/top_p/top_k;
- optimiser: lr, grad_clip, num_epochs, minibatch_size (null: the whole batch in one step, as for TreeRPO),
  clip_eps_high -> clip_param;
- ``train_batch_size`` (RLlib's field): env steps, i.e. reasoning steps, sampled per iteration;
- PPO's own knobs come from :data:`PPO_DEFAULTS`, updated by a ``ppo:`` mapping when the config has one.
  ``kl_coef`` must be 0: RLlib's PPO KL term needs the old full token distribution, which is not stored.

Outputs, as `treerpo train` writes them: config.yaml, metrics.jsonl (reward/mean, reward/accuracy,
completions/mean_length, perf/generated_tokens, perf/prompts, loss/*), eval_before/after.json(l) through
:mod:`rllib_treerpo.jobs.train`, learning_curve.png, checkpoints/, final_model/, summary.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rllib_treerpo.jobs.config import JobConfig, flat_config
from rllib_treerpo.jobs.train import JobParts, train
from rllib_treerpo.learner.precision import resolve_config_dtype
from rllib_treerpo.rllib.config import TreeRPOConfig

# PPO settings without a TreeRPO field (override with a `ppo:` mapping).
PPO_DEFAULTS: dict[str, Any] = {
    "lambda_": 1.0,  # GAE lambda; with gamma 1 the advantage is the (normalised) return minus the value
    "gamma": 1.0,  # the reward is paid once, at the end of a short episode: no discount
    "vf_loss_coeff": 0.5,
    "vf_clip_param": 10.0,
    "entropy_coeff": 0.0,
    "num_envs_per_env_runner": 64,  # envs stepped together: one batched generate call per env step
    "max_prompt_tokens": 64,  # room for the prompt in the observation
    "value_detach": True,  # the critic reads the LM's hidden states but does not train the LM
    "value_hidden": 128,
}


def ppo_settings(config: TreeRPOConfig, ppo_section: dict | None = None) -> dict:
    """PPO_DEFAULTS updated by a config's ``ppo:`` section; checks it and that kl_coef is 0."""
    ppo_section = dict(ppo_section or {})
    unknown = set(ppo_section) - set(PPO_DEFAULTS) - {"use_kl_loss", "clip_param", "kl_coeff"}
    if unknown:
        raise ValueError(
            f"config field 'ppo': unknown key(s) {sorted(unknown)}; known: {sorted(PPO_DEFAULTS)}"
        )
    if config.kl_coef:
        raise ValueError(
            f"config field 'kl_coef' = {config.kl_coef}: the PPO baseline runs without RLlib's KL "
            "term (the LM module keeps only sampled token log-probs); set kl_coef: 0"
        )
    return {**PPO_DEFAULTS, **ppo_section}


def build_ppo_config(config: TreeRPOConfig, ppo: dict | None = None):
    """A stock ``PPOConfig`` for the token-id env and the LM module, from the shared TreeRPO fields."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rllib_treerpo.baselines.ppo.module import PPOCausalLMModule
    from rllib_treerpo.baselines.ppo.tokenized_env import TokenizedReasoningEnv

    p = {**PPO_DEFAULTS, **(ppo or {})}
    steps = len(config.branching)
    batch = int(config.train_batch_size)
    env_config = {
        "env": config.env,
        "env_config": dict(config.env_config),
        "tokenizer": config.model_name_or_path,
        "step_tokens": config.step_tokens,
        "max_steps": steps,
        "stop_at_eos": config.stop_at_eos,
        "max_prompt_tokens": p["max_prompt_tokens"],
    }
    model_config = {
        "model_name_or_path": config.model_name_or_path,
        "dtype": resolve_config_dtype(config),  # auto: resolved here unless load_run_config did
        "backend": config.backend,
        "step_delimiter": config.step_delimiter,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "stop_at_eos": config.stop_at_eos,
        "value_detach": p["value_detach"],
        "value_hidden": p["value_hidden"],
    }
    return (
        PPOConfig()
        .environment(env=TokenizedReasoningEnv, env_config=env_config)
        .env_runners(
            num_env_runners=config.num_env_runners, num_envs_per_env_runner=p["num_envs_per_env_runner"]
        )
        .learners(num_learners=config.num_learners)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=PPOCausalLMModule, model_config=model_config))
        .training(
            lr=config.lr,
            grad_clip=config.grad_clip,
            grad_clip_by="global_norm",
            train_batch_size=batch,
            num_epochs=config.num_epochs,
            minibatch_size=config.minibatch_size,
            gamma=p["gamma"],
            lambda_=p["lambda_"],
            clip_param=p.get("clip_param", config.clip_eps_high),
            use_kl_loss=p.get("use_kl_loss", False),
            vf_loss_coeff=p["vf_loss_coeff"],
            vf_clip_param=p["vf_clip_param"],
            entropy_coeff=p["entropy_coeff"],
        )
        .callbacks(on_sample_end=_count_tokens)
        .debugging(seed=config.seed)
        .reporting(metrics_num_episodes_for_smoothing=1)
    )


def _count_tokens(*, samples, metrics_logger=None, **kwargs) -> None:
    """Per sample() call: generated tokens, new prompts, and the finished episodes' returns and lengths."""
    generated = prompts = done = correct = 0
    returns = lengths = 0.0
    for episode in samples:
        actions = np.asarray(episode.get_actions())
        tokens = int(actions[:, 0].sum()) if len(actions) else 0
        generated += tokens
        if episode.t_started == 0:
            prompts += 1
            if episode.is_done:  # a whole episode in this chunk: its response length and reward
                ret = float(episode.get_return())
                done = done + 1
                returns = returns + ret
                lengths = lengths + tokens
                correct = correct + (ret >= 1 - 1e-9)
    for key, value in {
        "generated_tokens": generated,
        "prompts": prompts,
        "episodes": done,
        "return_sum": returns,
        "length_sum": lengths,
        "correct": correct,
    }.items():
        metrics_logger.log_value(("tokens", key), value, reduce="sum")


def ppo_metrics_row(result: dict) -> dict:
    """metrics.jsonl row with the names `treerpo train` uses (reward/*, completions/*, loss/*, perf/*)."""
    runners = result.get("env_runners", {})
    learner = result.get("learners", {}).get("default_policy", {})
    t = runners.get("tokens", {})
    episodes = max(t.get("episodes", 0), 1)
    row = {
        "iteration": int(result["training_iteration"]),
        "reward/mean": t.get("return_sum", 0.0) / episodes,
        "reward/accuracy": t.get("correct", 0) / episodes,
        "completions/mean_length": t.get("length_sum", 0.0) / episodes,
        "perf/generated_tokens": float(t.get("generated_tokens", 0)),
        "perf/prompts": float(t.get("prompts", 0)),
        "perf/episodes_finished": float(t.get("episodes", 0)),
        "perf/env_steps": float(runners.get("num_env_steps_sampled", 0)),
    }
    for src, dst in (
        ("policy_loss", "policy_loss"),
        ("vf_loss", "vf_loss"),
        ("entropy", "entropy"),
        ("vf_explained_var", "vf_explained_var"),
        ("gradients_default_optimizer_global_norm", "grad_norm"),
    ):
        if src in learner:
            row[f"loss/{dst}"] = float(learner[src])
    timers = result.get("timers", {})
    row["perf/sample_seconds"] = float(timers.get("env_runner_sampling_timer", 0.0))
    row["perf/learn_seconds"] = float(timers.get("learner_update_timer", 0.0))
    return row


def ppo_parts(config: TreeRPOConfig, job: JobConfig, ppo: dict | None = None) -> JobParts:
    """The PPO pieces of the shared `treerpo train` job (:func:`rllib_treerpo.jobs.train.train`)."""
    from rllib_treerpo.config.preflight import preflight

    ppo = {**PPO_DEFAULTS, **(ppo or {})}

    def resolved() -> dict:
        return {
            **flat_config(config, job),
            "algorithm": "PPO",
            "train_batch_size": config.train_batch_size,
            "ppo": ppo,
        }

    def progress(row: dict) -> str:
        return (
            f"PPO reward {row['reward/mean']:.3f}  len {row['completions/mean_length']:.1f}  vf_ev "
            f"{row.get('loss/vf_explained_var', 0):.2f}  {row['perf/generated_tokens'] / 1e3:.1f}k tokens"
        )

    return JobParts(
        # The shared fields' values were checked when the config was loaded; then the run on this machine.
        preflight=lambda: preflight(config, job.eval_env_config, job.tiny_model),
        build_algo=lambda: build_ppo_config(config, ppo).build_algo(),
        metrics_row=ppo_metrics_row,
        progress=progress,
        resolved=resolved,
        label="PPO",
        totals={"generated_tokens": "perf/generated_tokens", "prompts": "perf/prompts"},
    )


def train_ppo(
    config: TreeRPOConfig,
    job: JobConfig,
    output: str | Path,
    *,
    ppo: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """The `treerpo train` job with RLlib's PPO; returns summary.json's content."""
    ppo = ppo_settings(config, ppo)
    return train(
        config, job, output, resume=resume, overwrite=overwrite, parts=lambda c, j: ppo_parts(c, j, ppo)
    )
