"""Any reasoning-gym task as a ReasoningEnv: ``gymnasium.make("treerpo/ReasoningGym-v0", task="chain_sum")``.

reasoning-gym (optional dependency, ``pip install reasoning-gym==0.1.25``, the ``data`` extra) generates
problems offline with ``reasoning_gym.create_dataset(name, size=, seed=)`` and scores answers with the
dataset's own ``score_answer(answer, entry)``. This env wraps one task:

- prompt: ``prompt_template`` with ``{question}`` replaced literally by the task's question. The default
  template tells the policy the answer format: ``"<question>\\nGive the final answer as
  \\boxed{ANSWER}.\\n"``.
- answer rule: ``answer_format`` (envs/answers.py), by default ``boxed``: the content of the LAST closed
  ``\\boxed{...}`` of the response (balanced braces, surrounding whitespace stripped) is the final answer;
  also ``answer_tag`` (``<answer>X</answer>``) and ``answer_is`` ("The answer is X", "Answer: X"), the one
  ending last wins. No answer: reward 0. A step that holds a complete answer (closes a box) ends the episode.
  Change ``prompt_template`` too when you change the format: the default one asks for a box.
- reward: ``score_answer(final_answer, entry)`` of the task, clamped to [0, 1]; an exception in the scorer
  scores 0. Some tasks give partial credit (reasoning-gym's default scorer pays
  ``len(gold) / len(answer)`` when the gold is a substring of the answer); evaluation counts a problem as
  solved only at reward 1. The scorer runs in-process (a few tasks parse answers with sympy).
- splits, disjoint by construction: one reasoning-gym dataset with ``seed`` is generated, in which the TEST
  split is items ``[0, test_size)`` and the TRAIN split is items ``[test_size, test_size + size)``
  (reasoning-gym derives item ``i`` from ``Random(seed + i)``, so different indices, not different seeds,
  keep the splits apart). A train item whose question text equals a test question is replaced by the next
  item, so no test question is ever trained on.
- ``reset(options={"problem_index": i})`` returns problem ``i`` of the env's split (deterministic, for
  evaluation); ``reset()`` without it draws a uniformly random problem of the split.

Items are generated lazily and cached (a few tasks, e.g. countdown, take 25 ms per item); the test split is
generated at construction. The Text spaces' charset is printable ASCII plus every character of the test split
and of the first train items; pass ``charset=`` for tasks with rarer characters.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import numpy as np

from envs import answers
from envs.base import ReasoningEnv, build_charset

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "ReasoningGymEnv", "extract_answer", "task_names"]

DEFAULT_PROMPT_TEMPLATE = "{question}\nGive the final answer as \\boxed{ANSWER}.\n"
_SPLITS = ("train", "test")
_CHARSET_TRAIN_SAMPLE = 64  # train items scanned for the charset (on top of the whole test split)


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as e:  # optional dependency
        raise ImportError(
            "treerpo/ReasoningGym-v0 needs reasoning-gym: pip install reasoning-gym==0.1.25 "
            "(or the project's `data` extra)"
        ) from e
    return reasoning_gym


def task_names() -> list[str]:
    """Sorted names of every reasoning-gym task."""
    _reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def extract_answer(response: str, answer_format: str | list[str] | tuple[str, ...] = "boxed") -> str | None:
    """The final answer of a response (default: the last closed ``\\boxed{...}``'s content, stripped); None if
    none. ``answer_format``: see envs/answers.py."""
    return answers.extract_answer(response, answers.check_answer_format(answer_format))


class ReasoningGymEnv(ReasoningEnv):
    """One reasoning-gym task as a ReasoningEnv (module docstring: prompt, answer rule, reward, splits).

    Args: task: reasoning-gym task name, e.g. ``"basic_arithmetic"``, ``"chain_sum"``, ``"gsm_symbolic"``.
        split: ``"train"`` or ``"test"``. size: number of train problems (indices ``[test_size, test_size +
        size)`` of the dataset). test_size: number of test problems (indices ``[0, test_size)``). seed: the
        reasoning-gym dataset seed; also seeds the random problem stream of ``reset()``. task_config: extra
        fields of the task's reasoning-gym config, e.g. ``{"min_terms": 2}``. prompt_template: must contain
        ``{question}`` (replaced literally; LaTeX braces need no escaping). answer_format: where a response's
        answer is: one name or a list of ``boxed`` (default), ``answer_tag``, ``answer_is`` (envs/answers.py).
        stop_text, max_steps, max_chars, charset, render_mode: see ReasoningEnv.
    """

    def __init__(
        self,
        *,
        task: str | None = None,
        split: str = "train",
        size: int = 10_000,
        test_size: int = 100,
        seed: int | None = 0,
        task_config: dict[str, Any] | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        answer_format: str | list[str] | tuple[str, ...] = "boxed",
        stop_text: str | None = None,
        max_steps: int = 8,
        max_chars: int = 4096,
        charset: str | None = None,
        render_mode: str | None = None,
    ) -> None:
        rg = _reasoning_gym()
        names = task_names()
        if task is None:
            raise ValueError(
                "treerpo/ReasoningGym-v0 needs task=, e.g. gymnasium.make('treerpo/ReasoningGym-v0', "
                f"task='chain_sum'); {len(names)} tasks: {', '.join(names)}"
            )
        if task not in names:
            close = difflib.get_close_matches(str(task), names, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"unknown reasoning-gym task {task!r}{hint} (see envs.reasoning_gym.task_names())"
            )
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        for name, value, low in (("size", size, 1), ("test_size", test_size, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if split == "test" and test_size == 0:
            raise ValueError("split='test' needs test_size >= 1")
        if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
        self.answer_format = answers.check_answer_format(answer_format)
        task_config = dict(task_config or {})
        for key in ("size", "seed"):
            if key in task_config:
                raise ValueError(f"task_config must not set {key!r}: use the env's own {key}= argument")
        self.task = task
        self.split = split
        self.size = size
        self.test_size = test_size
        self.dataset_seed = 0 if seed is None else int(seed)
        self.prompt_template = prompt_template
        self._dataset = self._create_dataset(rg, task, task_config, test_size + size, self.dataset_seed)
        self._items: dict[int, dict[str, Any]] = {}  # dataset index -> entry; a cache shared by clones
        self._test_questions = frozenset(self._item(i)["question"] for i in range(test_size))
        self._entry: dict[str, Any] | None = None
        if charset is None:
            sample = [self._item(i) for i in range(test_size)]
            sample += [self._item(self._dataset_index(i)) for i in range(min(size, _CHARSET_TRAIN_SAMPLE))]
            charset = build_charset(self._render_prompt(e) + str(e["answer"]) for e in sample)
        super().__init__(
            stop_text=stop_text,
            max_steps=max_steps,
            max_chars=max_chars,
            charset=charset,
            render_mode=render_mode,
        )
        self._seed_stream(seed)

    @staticmethod
    def _create_dataset(rg, task: str, task_config: dict[str, Any], size: int, seed: int):
        import dataclasses

        from reasoning_gym.factory import DATASETS

        config_cls = DATASETS[task][1]
        valid = (
            [f.name for f in dataclasses.fields(config_cls)] if dataclasses.is_dataclass(config_cls) else None
        )
        if valid is not None:
            unknown = sorted(set(task_config) - set(valid))
            if unknown:
                raise ValueError(
                    f"task_config of {task!r}: unknown field(s) {unknown}; valid: "
                    f"{sorted(set(valid) - {'size', 'seed'})}"
                )
        try:
            return rg.create_dataset(task, size=size, seed=seed, **task_config)
        except (AssertionError, TypeError, ValueError) as e:
            raise ValueError(f"task_config of {task!r} = {task_config}: {e}") from e

    # ------------------------------------------------------------------ problems
    def _item(self, index: int) -> dict[str, Any]:
        entry = self._items.get(index)
        if entry is None:
            entry = self._dataset[index]
            self._items[index] = entry
        return entry

    def _dataset_index(self, problem_index: int) -> int:
        """Dataset index of problem ``problem_index`` of the env's split (train skips test questions)."""
        if self.split == "test":
            return problem_index
        index = self.test_size + problem_index
        while self._item(index)["question"] in self._test_questions:
            index += 1
        return index

    def _render_prompt(self, entry: dict[str, Any]) -> str:
        return self.prompt_template.replace("{question}", str(entry["question"]))

    @property
    def num_problems(self) -> int:
        """Problems in the env's split (valid ``problem_index`` values are ``0 .. num_problems - 1``)."""
        return self.test_size if self.split == "test" else self.size

    @property
    def entry(self) -> dict[str, Any] | None:
        """The current problem's reasoning-gym entry (question, answer, metadata)."""
        return self._entry

    # ------------------------------------------------------------------ ReasoningEnv hooks
    def _sample_problem(self, rng: np.random.Generator, options: dict[str, Any]) -> tuple[str, str, str]:
        index = options.get("problem_index")
        if index is None:
            index = int(rng.integers(self.num_problems))
        elif not 0 <= int(index) < self.num_problems:
            raise IndexError(
                f"problem_index {index} out of range [0, {self.num_problems}) of split {self.split!r}"
            )
        entry = self._item(self._dataset_index(int(index)))
        self._entry = entry
        return f"{self.task}/{self.split}/{int(index)}", self._render_prompt(entry), str(entry["answer"])

    def _score(self, response: str, answer: str) -> float:
        final = answers.extract_answer(response, self.answer_format)
        if final is None or self._entry is None:
            return 0.0
        try:
            score = float(self._dataset.score_answer(final, self._entry))
        except Exception:  # noqa: BLE001 - a scorer failure on model text is "not correct"
            return 0.0
        return min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0

    def is_final(self, step_text: str) -> bool:
        """The step holds a complete answer (closes a ``\\boxed{...}`` by default): the response ends."""
        return answers.has_final_answer(step_text, self.answer_format)
