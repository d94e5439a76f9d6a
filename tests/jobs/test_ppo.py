"""The PPO baseline: token-id env wrapper, LM module for whole-step actions, stock RLlib PPO for an
iteration."""

import warnings

import numpy as np
import pytest
import torch

ENV_KW = {"env": "treerpo/Arithmetic-v0", "env_config": {"num_ops": 1}, "step_tokens": 12, "max_steps": 2}


@pytest.fixture
def tokenized(tiny_lm_dir):
    from rllib_treerpo.baselines.ppo.tokenized_env import TokenizedReasoningEnv

    return TokenizedReasoningEnv(tokenizer=tiny_lm_dir, **ENV_KW)


def test_wrapper_passes_gymnasium_env_checker(tokenized):
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(tokenized, skip_render_check=True)
    assert not [w for w in caught if "spec" not in str(w.message)], [str(w.message) for w in caught]


def test_wrapper_round_trips_the_text_env(tokenized):
    obs, info = tokenized.reset(seed=3)
    text_env = tokenized.reasoning_env
    assert tokenized.observation_space.contains(obs)
    assert tokenized.observation_text(obs) == text_env.prompt
    first = info["problem_id"]
    step = f"{first}=0\n"
    action = tokenized.encode_action(step)
    assert tokenized.action_space.contains(action) and tokenized.decode(tokenized.unpack(action)) == step
    obs, reward, terminated, truncated, _ = tokenized.step(action)
    assert tokenized.observation_text(obs) == text_env.prompt + text_env.response == text_env.prompt + step
    assert not terminated and not truncated and reward == 0.0
    answer = text_env.answer
    obs, reward, terminated, truncated, _ = tokenized.step(tokenized.encode_action(f"\\boxed{{{answer}}}"))
    assert terminated and reward == 1.0
    assert tokenized.decode(tokenized.encode("7+5-3=?\n12")) == "7+5-3=?\n12"


def test_step_distribution_logp_is_the_masked_sum_of_token_logprobs(tiny_lm_dir, tokenized):
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from transformers import AutoModelForCausalLM

    from rllib_treerpo.baselines.ppo.module import PPOCausalLMModule
    from rllib_treerpo.learner.forward import token_logprobs

    module = RLModuleSpec(
        module_class=PPOCausalLMModule,
        observation_space=tokenized.observation_space,
        action_space=tokenized.action_space,
        model_config={"model_name_or_path": tiny_lm_dir, "step_delimiter": "\n"},
    ).build()
    torch.manual_seed(0)
    observations = [tokenized.reset(seed=s)[0] for s in (1, 2, 3)]
    batch = {Columns.OBS: torch.as_tensor(np.stack(observations))}
    out = module.forward_exploration(batch)
    actions = out[Columns.ACTIONS]
    assert actions.shape == (3, 13) and all(tokenized.action_space.contains(a) for a in actions.numpy())
    train = module.forward_train({**batch, Columns.ACTIONS: actions})
    dist = module.get_train_action_dist_cls().from_logits(train[Columns.ACTION_DIST_INPUTS])
    np.testing.assert_allclose(
        dist.logp(actions).detach().numpy(), out[Columns.ACTION_LOGP].numpy(), atol=1e-4
    )
    # The same number from a plain forward of the full sequence.
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    for obs, act, logp in zip(observations, actions.numpy(), out[Columns.ACTION_LOGP].numpy(), strict=True):
        ctx, step = tokenized.unpack(obs), tokenized.unpack(act)
        ids = torch.as_tensor(np.concatenate([ctx, step]))[None]
        with torch.no_grad():
            expected = token_logprobs(fresh(input_ids=ids).logits, ids)[0, len(ctx) :].sum().item()
        assert logp == pytest.approx(expected, abs=1e-4)
    values = module.compute_values(batch)
    assert values.shape == (3,)
    assert torch.allclose(
        values, module.compute_values(batch, embeddings=train[Columns.EMBEDDINGS]), atol=1e-5
    )


def test_stock_ppo_trains_one_iteration(tiny_lm_dir, ray_session, tmp_path):
    from ray.rllib.algorithms.ppo import PPO
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_treerpo.baselines.ppo.job import build_ppo_config, ppo_metrics_row
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig
    from rllib_treerpo.rllib.rl_module import learner_policy_weights as policy_weights

    config = TreeRPOConfig.from_yaml(
        None,
        {
            "algorithm": "PPO",
            "model_name_or_path": tiny_lm_dir,
            "env_config": {"num_ops": 1},
            "branching": [1, 1],
            "step_tokens": 6,
            "step_delimiter": "\n",
            "lr": 1e-3,
            "seed": 0,
            "train_batch_size": 32,
            "minibatch_size": 16,
            "num_epochs": 2,
        },
    )
    ppo_config = build_ppo_config(config, {"num_envs_per_env_runner": 8})
    algo = ppo_config.build_algo()
    try:
        assert type(algo) is PPO
        before = {k: v.clone() for k, v in policy_weights(algo).items()}
        row = ppo_metrics_row(algo.train())
        assert row["perf/generated_tokens"] > 0 and row["perf/prompts"] >= 8
        assert np.isfinite(row["loss/policy_loss"]) and np.isfinite(row["loss/vf_loss"])
        after = policy_weights(algo)
        assert any(not torch.equal(before[k], after[k]) for k in before)
        # the env runner acts with the learner's new weights
        runner = algo.env_runner.module.get_state()
        learner = algo.learner_group.get_state()["learner"]["rl_module"][DEFAULT_MODULE_ID]
        assert all(torch.equal(torch.as_tensor(learner[k]), runner[k]) for k in learner)
    finally:
        algo.stop()


def test_train_ppo_job_writes_the_train_outputs(tiny_lm_dir, ray_session, tmp_path):
    import json

    from rllib_treerpo.baselines.ppo.job import train_ppo
    from rllib_treerpo.jobs.config import load_run_config

    out = tmp_path / "run"
    config, job, _ = load_run_config(
        None,
        {
            "algorithm": "PPO",
            "model_name_or_path": tiny_lm_dir,
            "env_config": {"num_ops": 1},
            "branching": [1, 1],
            "step_tokens": 6,
            "step_delimiter": "\n",
            "train_batch_size": 16,
            "minibatch_size": 16,
            "iterations": 1,
            "eval_problems": 2,
            "eval_samples": 1,
            "seed": 1,
        },
    )
    summary = train_ppo(config, job, out, ppo={"num_envs_per_env_runner": 4})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and "eval/pass@1" in rows[0] and "eval/pass@1" in rows[1]
    rows = rows[1:]  # the training iterations
    assert rows[0]["perf/generated_tokens"] > 0 and "reward/mean" in rows[0]
    for name in (
        "eval_before.json",
        "eval_after.json",
        "summary.json",
        "config.yaml",
        "final_model/config.json",
    ):
        assert (out / name).exists(), name
    assert summary["algorithm"] == "PPO" and summary["generated_tokens"] == rows[0]["perf/generated_tokens"]
    assert "pass@1" in summary["eval_after"]
