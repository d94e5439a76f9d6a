"""Math word problems from a dataset, scored by math-verify (docs/algorithm.md s.2).

The dataset is a ``datasets.Dataset`` (or ``DatasetDict``), a local file (.jsonl/.json/.parquet/
.csv, loaded with ``datasets.load_dataset(<format>, data_files=...)``) or a hub dataset name
(``load_dataset(name, split=...)``; needs network). Every row is validated at construction, so a
broken dataset fails before training starts rather than as silently-zero rewards: a problem must be
non-empty, the gold answer must parse with math-verify (otherwise no response could ever earn
reward), and the prompt must fit ``max_chars``.

By default math-verify reads the whole response (its last ``\\boxed{}``, else its last expression) and a
closed box ends the response. With ``answer_format`` (envs/answers.py: ``boxed``, ``answer_tag``,
``answer_is``, ``last_number``) the answer is extracted in one of those forms and verified with math-verify
against the gold answer; a response without one scores 0, and a step holding a complete answer ends the
response.

The rows are copied once into a tuple of plain strings that clones share (no dataset copies).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from envs.answers import DEFAULT_ANSWER_FORMAT, check_answer_format, extract_answer, has_final_answer
from envs.base import ReasoningEnv, build_charset
from envs.rewards import can_parse_answer, math_reward

__all__ = ["MathProblemsEnv", "load_problem_table"]

logger = logging.getLogger(__name__)

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_problem_table(dataset: Any, split: str = "train", config: str | None = None) -> Any:
    """Return a ``datasets.Dataset`` from a Dataset/DatasetDict, a local file path or a hub name."""
    import datasets  # lazy: heavy import, only needed here

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"split {split!r} not in the DatasetDict; available: {sorted(dataset)}")
        return dataset[split]
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if isinstance(dataset, os.PathLike) or (isinstance(dataset, str) and os.path.exists(dataset)):
        path = os.fspath(dataset)
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FILE_FORMATS:
            raise ValueError(f"cannot read {path!r}: supported file types are {sorted(_FILE_FORMATS)}")
        # A single file is named ``split`` so that any split name works with local files.
        return datasets.load_dataset(_FILE_FORMATS[ext], data_files={split: path}, split=split)
    if isinstance(dataset, str):
        if os.path.splitext(dataset)[1].lower() in _FILE_FORMATS or dataset.startswith(("/", ".", "~")):
            raise ValueError(f"env_config field 'dataset' = {dataset!r}: no such file")
        try:
            return datasets.load_dataset(dataset, config, split=split)  # hub name: needs network
        except OSError as e:  # not found, no network
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"env_config field 'dataset' = {dataset!r}: cannot load it from the hub: {why}"
            ) from e
    raise TypeError(
        "dataset must be a datasets.Dataset/DatasetDict, a path to a .jsonl/.json/.parquet/.csv "
        f"file, or a hub dataset name; got {type(dataset).__name__}"
    )


class MathProblemsEnv(ReasoningEnv):
    """Problems and gold answers from a table; the response ends at a complete answer (``answer_format``).

    Args:
        dataset: see ``load_problem_table`` (required).
        split: dataset split (hub names and DatasetDicts); also names a local file's only split.
        dataset_config: hub configuration name, if the dataset has several.
        problem_column, answer_column: column names.
        prompt_template: must contain ``{problem}``, replaced literally (no ``str.format``, so LaTeX
            braces in the template need no escaping).
        on_bad_row: ``"raise"`` (default) or ``"skip"`` (counted in ``num_skipped_rows``, warned).
        seed: seeds the random problem stream of ``reset()`` without options.
        validate_answers: parse every gold answer with math-verify at construction (about 1 ms
            per row; switch off only for very large, trusted tables).
        answer_format: where a response's answer is, one name or a list of ``boxed``, ``answer_tag``,
            ``answer_is``, ``last_number`` (envs/answers.py; the answer that ends last counts). Default None:
            math-verify reads the whole response (its last ``\boxed{}``, else its last expression), as before.
        stop_text, max_steps, max_chars, charset, render_mode: see ReasoningEnv.

    ``reset(options={"problem_index": i})`` picks row ``i`` of the kept rows (0 <= i < num_problems).
    ``problem_id`` is ``"<split>/<row index in the table>"``.
    """

    def __init__(
        self,
        *,
        dataset: Any = None,
        split: str = "train",
        dataset_config: str | None = None,
        problem_column: str = "problem",
        answer_column: str = "answer",
        prompt_template: str = "{problem}\n",
        on_bad_row: str = "raise",
        seed: int | None = None,
        validate_answers: bool = True,
        answer_format: str | list[str] | tuple[str, ...] | None = None,
        stop_text: str | None = None,
        max_steps: int = 8,
        max_chars: int = 4096,
        charset: str | None = None,
        render_mode: str | None = None,
    ) -> None:
        if dataset is None:
            raise ValueError(
                "MathProblemsEnv needs dataset=: a datasets.Dataset, a local .jsonl/.json/.parquet/"
                ".csv path, or a hub dataset name, e.g. "
                "gymnasium.make('treerpo/MathProblems-v0', dataset='train.jsonl')"
            )
        if not isinstance(prompt_template, str) or "{problem}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{problem}}', got {prompt_template!r}")
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
        # None: math-verify reads the whole response itself (its last \boxed{}, else its last expression).
        self.answer_format = None if answer_format is None else check_answer_format(answer_format)
        table = load_problem_table(dataset, split, dataset_config)
        for column in (problem_column, answer_column):
            if column not in table.column_names:
                raise ValueError(
                    f"column {column!r} not found in the dataset; available columns: {table.column_names}"
                )
        self.split = split
        self.prompt_template = prompt_template
        rows, skipped = self._validated_rows(
            table[problem_column],
            table[answer_column],
            problem_column,
            answer_column,
            max_chars,
            on_bad_row,
            validate_answers,
        )
        if not rows:
            raise ValueError(f"no usable rows in the dataset ({len(table)} rows, {skipped} skipped as bad)")
        if skipped:
            logger.warning("MathProblemsEnv skipped %d of %d bad rows", skipped, len(table))
        self.num_skipped_rows = skipped
        self._rows: tuple[tuple[int, str, str], ...] = tuple(rows)  # shared by clones
        super().__init__(
            stop_text=stop_text,
            max_steps=max_steps,
            max_chars=max_chars,
            charset=charset if charset is not None else build_charset(p + a for _, p, a in rows),
            render_mode=render_mode,
        )
        self._seed_stream(seed)

    def _validated_rows(
        self,
        problems: list[Any],
        answers: list[Any],
        problem_column: str,
        answer_column: str,
        max_chars: int,
        on_bad_row: str,
        validate_answers: bool,
    ) -> tuple[list[tuple[int, str, str]], int]:
        rows: list[tuple[int, str, str]] = []
        skipped = 0
        parse_ok: dict[str, bool] = {}
        for i, (problem, answer) in enumerate(zip(problems, answers, strict=True)):
            if (
                isinstance(answer, list | tuple) and len(answer) == 1
            ):  # e.g. OlympiadBench's final_answer: [x]
                answer = answer[0]
            answer_text = "" if answer is None else str(answer).strip()
            problem_text = "" if problem is None else str(problem)
            error = None
            if not problem_text.strip():
                error = f"column {problem_column!r} is missing or empty"
            elif not answer_text:
                error = f"column {answer_column!r} is missing or empty"
            elif validate_answers:
                if answer_text not in parse_ok:
                    parse_ok[answer_text] = can_parse_answer(answer_text)
                if not parse_ok[answer_text]:
                    error = f"column {answer_column!r}: math-verify cannot parse {answer_text[:80]!r}"
            prompt = self.prompt_template.replace("{problem}", problem_text)
            if error is None and len(prompt) > max_chars:
                error = f"prompt has {len(prompt)} characters, more than max_chars={max_chars}"
            if error is not None:
                if on_bad_row == "raise":
                    raise ValueError(f"bad row {i}: {error} (on_bad_row='skip' skips such rows)")
                skipped += 1
                continue
            rows.append((i, prompt, answer_text))
        return rows, skipped

    @property
    def num_problems(self) -> int:
        return len(self._rows)

    def problems(self) -> list[tuple[str, str]]:
        """``(prompt, answer)`` of every kept row, in order (index = ``problem_index``)."""
        return [(prompt, answer) for _, prompt, answer in self._rows]

    # ------------------------------------------------------------------ ReasoningEnv hooks
    def _sample_problem(self, rng: np.random.Generator, options: dict[str, Any]) -> tuple[str, str, str]:
        index = options.get("problem_index")
        if index is None:
            index = int(rng.integers(len(self._rows)))
        elif not 0 <= int(index) < len(self._rows):
            raise IndexError(f"problem_index {index} out of range [0, {len(self._rows)})")
        row, prompt, answer = self._rows[int(index)]
        return f"{self.split}/{row}", prompt, answer

    def _score(self, response: str, answer: str) -> float:
        if self.answer_format is None:
            return math_reward(response, answer)
        final = extract_answer(response, self.answer_format)
        # Boxed, so that math-verify reads the extracted answer itself (its box rule has the top priority).
        return 0.0 if final is None else math_reward(f"\\boxed{{{final}}}", answer)

    def is_final(self, step_text: str) -> bool:
        """The step holds a complete answer (a closed box, by default): the answer is given, the response
        ends.

        An answer split across two steps does not end the episode early, but it is still scored.
        """
        return has_final_answer(step_text, self.answer_format or DEFAULT_ANSWER_FORMAT)
