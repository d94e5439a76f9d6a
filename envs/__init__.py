"""Reasoning environments for TreeRPO (ARCHITECTURE.md, "Environment contract").

Importing this package registers the Gymnasium ids:

- ``treerpo/Arithmetic-v0``: 3 left-to-right +/- operations on operands 1-9 (the default task);
- ``treerpo/ArithmeticHard-v0``: 6 operations on operands 1-20;
- ``treerpo/MathProblems-v0``: problems from a dataset; needs ``dataset=`` (a ``datasets.Dataset``
  or a local .jsonl/.json/.parquet/.csv path or a hub name);
- ``treerpo/ReasoningGym-v0``: any reasoning-gym task; needs ``task=`` (e.g. ``"chain_sum"``; optional
  dependency reasoning-gym, see envs/reasoning_gym.py).

Adding a reasoning environment takes two steps:

1. subclass ``ReasoningEnv`` and implement ``_sample_problem(rng, options) -> (problem_id, prompt,
   answer)`` and ``_score(response, answer) -> float`` in [0, 1] (optionally ``is_final(step)``
   for an end marker, e.g. a closed ``\\boxed{}``; ``math_reward`` is a ready-made scorer);
2. register it: ``gymnasium.register("myproject/MyTask-v0", entry_point="mymodule:MyTaskEnv")``.

Use ``env.unwrapped`` for ``clone()`` and the text properties: gymnasium wrappers do not forward
them.
"""

from __future__ import annotations

import gymnasium

from envs.arithmetic import ArithmeticEnv
from envs.base import ReasoningEnv
from envs.math_problems import MathProblemsEnv
from envs.rewards import math_reward

__all__ = [
    "ArithmeticEnv",
    "MathProblemsEnv",
    "REGISTERED_IDS",
    "ReasoningEnv",
    "make_reasoning_env",
    "math_reward",
]

REGISTERED_IDS: dict[str, tuple[str, dict]] = {
    "treerpo/Arithmetic-v0": ("envs.arithmetic:ArithmeticEnv", {}),
    "treerpo/ArithmeticHard-v0": ("envs.arithmetic:ArithmeticEnv", {"num_ops": 6, "operand_max": 20}),
    "treerpo/MathProblems-v0": ("envs.math_problems:MathProblemsEnv", {}),
    "treerpo/ReasoningGym-v0": ("envs.reasoning_gym:ReasoningGymEnv", {}),
}

for _env_id, (_entry_point, _kwargs) in REGISTERED_IDS.items():
    if _env_id not in gymnasium.registry:  # importing twice (or reloading) must not warn or fail
        gymnasium.register(_env_id, entry_point=_entry_point, kwargs=dict(_kwargs))


def make_reasoning_env(env, env_config: dict | None = None) -> ReasoningEnv:
    """A ReasoningEnv from a registered id (``"treerpo/Arithmetic-v0"``) or a ReasoningEnv subclass.

    The env is unwrapped (gymnasium wrappers do not forward ``clone()`` or the text properties). A wrong id or
    argument is a ValueError naming the config field ``env`` / ``env_config``.
    """
    env_config = dict(env_config or {})
    if isinstance(env, str):
        try:
            instance = gymnasium.make(env, **env_config).unwrapped
        except gymnasium.error.Error as e:
            raise ValueError(f"config field 'env' = {env!r}: {e}") from e
    elif isinstance(env, type):
        instance = env(**env_config)
    else:
        raise ValueError(f"config field 'env' = {env!r}: expected a gymnasium id or a ReasoningEnv subclass")
    if not isinstance(instance, ReasoningEnv):
        raise ValueError(
            f"config field 'env' = {env!r} is a {type(instance).__name__}, not a ReasoningEnv: "
            "TreeRPO grows trees by cloning text environments"
        )
    return instance
