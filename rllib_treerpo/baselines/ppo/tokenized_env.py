"""Token-id view of a text ReasoningEnv, so stock RLlib algorithms (PPO) can drive the same task.

RLlib's default connectors mangle ``spaces.Text`` observations, so this env speaks token ids:

- observation: ``MultiDiscrete([max_obs_tokens + 1] + [vocab] * max_obs_tokens)``; ``obs[0]`` is the number n
  of real tokens, ``obs[1:1 + n]`` the ids of prompt + steps so far, the rest ``pad_id``;
- action: one reasoning step, ``MultiDiscrete([step_tokens + 1] + [vocab] * step_tokens)``; ``action[0]`` is
  the step's length n, ``action[1:1 + n]`` its token ids (the rest is ignored).

The explicit lengths make the layout unambiguous even when a policy samples the pad token itself. The
observation holds the ids exactly as they were generated (prompt ids, then each step's ids), never a
re-tokenisation of the text, like the tree sampler's paths. ``step(action)`` decodes the step (special tokens
kept, so the EOS text reaches the text env and ends the episode) and steps the inner env, whose reward is paid
at the end. The episode is at most ``max_steps`` steps (the inner env truncates there), so the observation
always fits.

``decode(obs_ids)`` round-trips the text env's observation (prompt + response) while no stop text was cut off,
and ``encode_action(step_text)`` is the inverse of what ``step`` decodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = ["TokenizedReasoningEnv"]


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer is None:
        raise ValueError(
            "TokenizedReasoningEnv needs `tokenizer`: a model folder (AutoTokenizer) or a tokenizer"
        )
    return tokenizer


class TokenizedReasoningEnv(gymnasium.Env):
    """A ReasoningEnv (``env``: gymnasium id or instance) seen through ``tokenizer``'s ids.

    ``TokenizedReasoningEnv({"tokenizer": ..., ...})`` (one mapping of these arguments) also works: that is
    how RLlib constructs an env class (``config.environment(env=TokenizedReasoningEnv, env_config={...})``).

    Args:
        env: a registered ReasoningEnv id (default ``treerpo/Arithmetic-v0``), a ReasoningEnv subclass or
            instance.
        env_config: constructor arguments of the text env (ignored for an instance).
        tokenizer: a model folder (``AutoTokenizer.from_pretrained``) or a tokenizer object.
        step_tokens: most tokens of one step (the action's width).
        max_steps: steps per episode (the text env truncates there and pays its reward).
        max_prompt_tokens: room for the prompt in the observation; a longer prompt is an error at reset.
        stop_at_eos: the tokenizer's EOS text ends the episode (the text env's ``stop_text``).
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        env: Any = "treerpo/Arithmetic-v0",
        *,
        env_config: dict | None = None,
        tokenizer: Any = None,
        step_tokens: int = 12,
        max_steps: int = 4,
        max_prompt_tokens: int = 64,
        stop_at_eos: bool = True,
        render_mode: str | None = None,
    ) -> None:
        from envs.base import ReasoningEnv

        if isinstance(env, Mapping):  # RLlib builds an env class from one mapping (its EnvContext)
            settings = {k: v for k, v in env.items() if k != "num_envs"}
            self.__init__(**settings)
            return
        if isinstance(env, str):
            env = gymnasium.make(env, **dict(env_config or {})).unwrapped
        elif isinstance(env, type):
            env = env(**dict(env_config or {}))
        if not isinstance(env, ReasoningEnv):
            raise ValueError(
                f"env {env!r} is not a ReasoningEnv (give a treerpo/* id, a subclass or an instance)"
            )
        self.reasoning_env = env
        for name, value in (
            ("step_tokens", step_tokens),
            ("max_steps", max_steps),
            ("max_prompt_tokens", max_prompt_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}")
        self.tokenizer = _load_tokenizer(tokenizer)
        self.step_tokens = step_tokens
        self.max_steps = max_steps
        self.max_prompt_tokens = max_prompt_tokens
        self.stop_at_eos = stop_at_eos
        self.render_mode = render_mode
        self.vocab_size = len(self.tokenizer)
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        self.pad_id = int(pad if pad is not None else 0)
        self.max_obs_tokens = max_prompt_tokens + max_steps * step_tokens
        self.observation_space = spaces.MultiDiscrete(
            [self.max_obs_tokens + 1] + [self.vocab_size] * self.max_obs_tokens
        )
        self.action_space = spaces.MultiDiscrete([step_tokens + 1] + [self.vocab_size] * step_tokens)
        self._ids: list[int] = []

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_action(self, step_text: str) -> np.ndarray:
        """The action whose decoded step is ``step_text`` (at most ``step_tokens`` tokens)."""
        ids = self.encode(step_text)
        if len(ids) > self.step_tokens:
            raise ValueError(
                f"step {step_text!r} has {len(ids)} tokens, more than step_tokens={self.step_tokens}"
            )
        return self.pack(ids, self.step_tokens)

    def pack(self, ids, width: int) -> np.ndarray:
        """``[n, ids..., pad...]`` of length ``width + 1`` (the layout of both spaces)."""
        out = np.full(width + 1, self.pad_id, dtype=np.int64)
        out[0] = len(ids)
        out[1 : 1 + len(ids)] = ids
        return out

    @staticmethod
    def unpack(packed) -> np.ndarray:
        """The real ids of a packed observation or action."""
        packed = np.asarray(packed)
        return packed[1 : 1 + int(packed[0])]

    def observation_text(self, obs) -> str:
        return self.decode(self.unpack(obs))

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        env = self.reasoning_env
        prompt, info = env.reset(seed=seed, options=options)
        env.stop_text = self.tokenizer.eos_token if self.stop_at_eos else None
        env.max_steps = self.max_steps
        ids = self.encode(prompt)
        if not ids or len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt of problem {info.get('problem_id')!r} has {len(ids)} tokens; it must have "
                f"1..max_prompt_tokens={self.max_prompt_tokens}"
            )
        self._ids = ids
        return self.pack(self._ids, self.max_obs_tokens), dict(info)

    def step(self, action):
        action = np.asarray(action)
        n = int(action[0])
        if not 0 <= n <= self.step_tokens:
            raise ValueError(f"action length {n} outside 0..step_tokens={self.step_tokens}")
        step_ids = [int(i) for i in action[1 : 1 + n]]
        _, reward, terminated, truncated, info = self.reasoning_env.step(self.decode(step_ids))
        self._ids = self._ids + step_ids
        return self.pack(self._ids, self.max_obs_tokens), float(reward), terminated, truncated, dict(info)

    def render(self) -> str | None:
        return self.reasoning_env.prompt + self.reasoning_env.response if self.render_mode == "ansi" else None
