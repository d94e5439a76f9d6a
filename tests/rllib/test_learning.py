"""A short seeded TreeRPO run through RLlib must raise the mean reward by a margin that could fail."""

import numpy as np

from envs.base import ReasoningEnv
from rllib_treerpo.rllib.algorithm import TreeRPOConfig


class DigitFirstEnv(ReasoningEnv):
    """Reward 1 when the response starts with a digit: about 10% for a random char-level model."""

    def __init__(self, **kwargs):
        super().__init__(max_steps=4, **kwargs)

    def _sample_problem(self, rng, options):
        i = int(options.get("problem_index", rng.integers(1000)))
        return str(i), f"{i}:", "digit"

    def _score(self, response, answer):
        return float(response[:1].isdigit())


def test_treerpo_raises_reward(tiny_lm_dir, ray_session):
    config = TreeRPOConfig.from_yaml(
        None,
        {
            "model_name_or_path": tiny_lm_dir,
            "branching": [4, 4],
            "step_tokens": 2,
            "prompts_per_iteration": 8,
            "tau": 0.0,
            "lr": 1e-2,
            "seed": 0,
            "stop_at_eos": False,
        },
    )
    config.env = DigitFirstEnv
    algo = config.build_algo()
    try:
        rewards = [algo.train()["reward/mean"] for _ in range(20)]
    finally:
        algo.stop()
    start, end = np.mean(rewards[:2]), np.mean(rewards[-3:])
    assert start < 0.35, rewards
    assert end > start + 0.3, rewards
