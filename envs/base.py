"""ReasoningEnv: a text environment where one action is one reasoning step.

The tree sampler (docs/algorithm.md s.1) grows a tree by cloning an env at a node and stepping each clone with
one sampled continuation. So the env is a small, cheap-to-copy state machine over strings:

- ``reset()`` picks a problem and returns its prompt;
- ``step(text)`` appends one reasoning step to the response;
- the episode ends when the step contains ``stop_text`` (the tokenizer's EOS text: terminated),
  when ``is_final(step)`` says the step holds the env's own end marker (terminated), or at
  ``max_steps`` steps / ``max_chars`` characters (truncated);
- the verifiable reward ``_score(response, answer)`` is paid once, at the end (docs/algorithm.md s.2: a
  truncated leaf is scored like any other).

Subclasses implement ``_sample_problem`` and ``_score`` and may override ``is_final``.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Iterable
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding

__all__ = ["ReasoningEnv", "build_charset"]


def build_charset(texts: Iterable[str] = (), base: str = string.printable) -> str:
    """Return a sorted string of ``base`` plus every character occurring in ``texts``.

    gymnasium's Text space defaults to alphanumerics only, so every env builds its
    charset from what its problems contain. Sorted so that seeded ``Text.sample`` is reproducible.
    """
    chars = set(base)
    for text in texts:
        chars.update(text)
    return "".join(sorted(chars))


class ReasoningEnv(gymnasium.Env):
    """Base class of the text reasoning environments (docs/architecture.md, "Environment contract").

    Observation: prompt + response so far (the full text). Action: one reasoning step (a string).
    Both spaces are ``Text(min_length=0, max_length=max_chars, charset=...)``; the observation is
    kept within ``max_chars`` by cutting the response and truncating the episode when it would
    overflow. Actions are not validated against the charset: a policy may emit any character, the
    charset only has to cover what the env and the policy normally produce.

    Clones (``clone()``) share the immutable problem data and spaces and copy only the episode
    state and the random generator, so branching a tree is cheap.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        *,
        stop_text: str | None = None,
        max_steps: int = 8,
        max_chars: int = 4096,
        charset: str | Iterable[str] | None = None,
        render_mode: str | None = None,
    ) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}")
        self.stop_text = stop_text
        self.max_steps = int(max_steps)
        self.max_chars = int(max_chars)
        self.render_mode = render_mode
        chars = build_charset() if charset is None else "".join(sorted(set(charset)))
        self.charset = chars
        self.observation_space = spaces.Text(max_length=self.max_chars, min_length=0, charset=chars)
        self.action_space = spaces.Text(max_length=self.max_chars, min_length=0, charset=chars)
        # Episode state (reset() fills it).
        self._problem_id: str | None = None
        self._prompt: str = ""
        self._answer: str = ""
        self._response: str = ""
        self._num_steps: int = 0
        self._done: bool = True
        self._started: bool = False

    # ----------------------------------------------------------------- subclass hooks
    def _sample_problem(self, rng: np.random.Generator, options: dict[str, Any]) -> tuple[str, str, str]:
        """Return ``(problem_id, prompt, answer)``; ``options`` may hold ``problem_index``."""
        raise NotImplementedError

    def _score(self, response: str, answer: str) -> float:
        """Reward in [0, 1] for a finished response (stop_text already removed)."""
        raise NotImplementedError

    def is_final(self, step_text: str) -> bool:
        """True when ``step_text`` carries the env's own end marker (default: none)."""
        return False

    # ----------------------------------------------------------------- seeding helper
    def _seed_stream(self, seed: int | None) -> None:
        """Seed ``np_random`` at construction, so ``reset()`` without a seed is reproducible."""
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(int(seed))

    # ----------------------------------------------------------------- gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        problem_id, prompt, answer = self._sample_problem(self.np_random, dict(options or {}))
        if len(prompt) > self.max_chars:
            raise ValueError(
                f"prompt of problem {problem_id!r} has {len(prompt)} characters, more than "
                f"max_chars={self.max_chars}; raise max_chars"
            )
        self._problem_id, self._prompt, self._answer = problem_id, prompt, answer
        self._response = ""
        self._num_steps = 0
        self._done = False
        self._started = True
        return self._prompt, {"problem_id": problem_id, "answer": answer}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if not self._started:
            raise RuntimeError("step() called before reset()")
        if self._done:
            raise RuntimeError("step() called after the episode ended; call reset() (or step a clone)")
        if not isinstance(action, str):
            raise TypeError(f"a step is a string, got {type(action).__name__}")
        old = self._response
        combined = old + action
        self._num_steps += 1

        stopped = False
        if self.stop_text:
            # Search from just before the old end: a stop string split across two steps counts too.
            start = max(0, len(old) - len(self.stop_text) + 1)
            pos = combined.find(self.stop_text, start)
            if pos >= 0:
                combined, stopped = combined[:pos], True

        budget = self.max_chars - len(self._prompt)
        capped = len(combined) > budget
        if capped:
            combined = combined[:budget]
        kept_step = combined[len(old) :] if len(combined) > len(old) else ""
        self._response = combined

        end_reason: str | None = None
        if stopped and not capped:
            end_reason = "stop_text"
        elif self.is_final(kept_step):
            end_reason = "final"
        elif capped:
            end_reason = "max_chars"
        elif self._num_steps >= self.max_steps:
            end_reason = "max_steps"
        terminated = end_reason in ("stop_text", "final")
        truncated = end_reason in ("max_chars", "max_steps")

        reward = 0.0
        info = self._info()
        if terminated or truncated:
            self._done = True
            reward = float(self._score(self._response, self._answer))
            info["end_reason"] = end_reason
        return self._prompt + self._response, reward, terminated, truncated, info

    def finish(self) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """End the episode now, as if the response had ended (terminated), and pay the reward.

        For callers that learn of the end out of band, e.g. a generation backend that stopped at
        an EOS token id whose text is not ``stop_text``. Adds no text and no step.
        """
        if not self._started:
            raise RuntimeError("finish() called before reset()")
        if self._done:
            raise RuntimeError("finish() called after the episode ended; call reset()")
        self._done = True
        info = self._info()
        info["end_reason"] = "finish"
        reward = float(self._score(self._response, self._answer))
        return self._prompt + self._response, reward, True, False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._prompt + self._response
        return None

    # ----------------------------------------------------------------- tree support
    def clone(self) -> ReasoningEnv:
        """An independent copy at the same state; problem data and spaces are shared, not copied."""
        new = copy.copy(self)
        if self._np_random is not None:
            new._np_random = copy.deepcopy(self._np_random)
        return new

    def _info(self) -> dict[str, Any]:
        return {
            "problem_id": self._problem_id,
            "answer": self._answer,
            "response": self._response,
            "num_steps": self._num_steps,
        }

    # ----------------------------------------------------------------- read-only state
    @property
    def prompt(self) -> str:
        return self._prompt

    @property
    def response(self) -> str:
        return self._response

    @property
    def answer(self) -> str:
        return self._answer

    @property
    def problem_id(self) -> str | None:
        return self._problem_id

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def done(self) -> bool:
        """True once the episode has ended (or before the first reset)."""
        return self._done
