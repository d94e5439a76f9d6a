"""Reasoning environments for TreeRPO (docs/architecture.md, "Environment contract").

Importing this package registers the Gymnasium ids:

- ``treerpo/Arithmetic-v0``: 3 left-to-right +/- operations on operands 1-9 (the default task);
- ``treerpo/ArithmeticHard-v0``: 6 operations on operands 1-20;
- ``treerpo/PlanArithmetic-v0``: two chains (2 and 5 operations on 1-9), the first answer line picks one
  (envs/plan_arithmetic.py: the task where step credit is a real question, docs/compare.md);
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
from envs.plan_arithmetic import PlanArithmeticEnv
from envs.rewards import math_reward

__all__ = [
    "ArithmeticEnv",
    "MathProblemsEnv",
    "PlanArithmeticEnv",
    "REGISTERED_IDS",
    "ReasoningEnv",
    "make_reasoning_env",
    "math_reward",
]

REGISTERED_IDS: dict[str, tuple[str, dict]] = {
    "treerpo/Arithmetic-v0": ("envs.arithmetic:ArithmeticEnv", {}),
    "treerpo/ArithmeticHard-v0": ("envs.arithmetic:ArithmeticEnv", {"num_ops": 6, "operand_max": 20}),
    "treerpo/PlanArithmetic-v0": ("envs.plan_arithmetic:PlanArithmeticEnv", {}),
    "treerpo/MathProblems-v0": ("envs.math_problems:MathProblemsEnv", {}),
    "treerpo/ReasoningGym-v0": ("envs.reasoning_gym:ReasoningGymEnv", {}),
}

for _env_id, (_entry_point, _kwargs) in REGISTERED_IDS.items():
    if _env_id not in gymnasium.registry:  # importing twice (or reloading) must not warn or fail
        gymnasium.register(_env_id, entry_point=_entry_point, kwargs=dict(_kwargs))


def make_reasoning_env(env, env_config: dict | None = None, *, field: str = "env_config") -> ReasoningEnv:
    """A ReasoningEnv from a registered id (``"treerpo/Arithmetic-v0"``) or a ReasoningEnv subclass.

    The env is unwrapped (gymnasium wrappers do not forward ``clone()`` or the text properties). A wrong id is
    a ValueError naming the config field ``env``; an argument the env refuses (unknown, wrong type, out of
    range), one naming ``field`` (the config field the arguments came from, e.g. ``eval_env_config``) and the
    argument.
    """
    if env_config is not None and not isinstance(env_config, dict):
        raise ValueError(f"config field {field!r} = {env_config!r}: must be a mapping of the env's arguments")
    env_config = dict(env_config or {})
    if not isinstance(env, str | type):
        raise ValueError(f"config field 'env' = {env!r}: expected a gymnasium id or a ReasoningEnv subclass")
    try:
        instance = gymnasium.make(env, **env_config).unwrapped if isinstance(env, str) else env(**env_config)
    except (gymnasium.error.UnregisteredEnv, gymnasium.error.DeprecatedEnv) as e:  # names the closest ids
        raise ValueError(f"config field 'env' = {env!r}: {e}") from e
    except (TypeError, ValueError, KeyError, gymnasium.error.Error) as e:
        raise ValueError(_argument_error(env, field, e)) from e
    if not isinstance(instance, ReasoningEnv):
        raise ValueError(
            f"config field 'env' = {env!r} is a {type(instance).__name__}, not a ReasoningEnv: "
            "TreeRPO grows trees by cloning text environments"
        )
    return instance


def _argument_error(env, field: str, error: Exception) -> str:
    """One line naming the config field and the argument an env's constructor refused."""
    import difflib
    import inspect
    import re

    name = env if isinstance(env, str) else env.__name__
    message = str(error).split(" was raised from the environment creator")[0]  # gymnasium's suffix
    message = " ".join(line.strip() for line in message.strip().splitlines()) or type(error).__name__
    unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unknown:
        cls = gymnasium.spec(env).entry_point if isinstance(env, str) else env
        if isinstance(cls, str):
            cls = gymnasium.envs.registration.load_env_creator(cls)
        keys = [p for p in inspect.signature(cls).parameters if p not in ("self", "kwargs", "render_mode")]
        close = difflib.get_close_matches(unknown.group(1), keys, n=2)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; it takes {keys}"
        return f"config field {field!r}: {name} has no argument {unknown.group(1)!r}{hint}"
    return f"config field {field!r}: {name}: {message}"
