"""Arithmetic with a planning choice: the first line picks one of two chains, and that pick decides how much
work (and risk) the rest of the answer holds. A task where step credit is a real question (docs/compare.md).

Format (every character is one token for the tiny char-level models):

- prompt: two labelled left-to-right chains, one SHORT (``short_ops`` operations) and one LONG (``long_ops``),
  in random order: ``"A:7+5-3|B:4+2-1+8-6+3=?\\n"``. Answer either one.
- response: the plan line (the chosen label), one line per operation of that chain, then the boxed value:
  ``"A\\n7+5=12\\n12-3=9\\n\\boxed{9}"``. One line is one step, so ``step_delimiter="\\n"`` makes the plan
  line a step of its own.
- reward: 1.0 iff the first line is exactly a label and the last closed ``\\boxed{...}`` (spaces removed) is
  the integer value of THAT chain; 0 otherwise (a fast exact check, no math-verify).

Both chains are correct answers, but each operation line is a chance to slip: a policy that makes a line
error with probability e solves the short chain with probability (1-e)^short_ops and the long one with
(1-e)^long_ops. The demonstrations pick a label at random (half short, half long), so a warm start on them has
no preference: the first step of every answer is a choice whose value is only visible through the rest of
the answer. The short chain is also the shorter answer, so the response length can move under RL.

Problems are a deterministic function of ``(seed, split, index)``; a problem belongs to the test split iff a
stable hash of its prompt is 0 mod 10, so the splits are disjoint by construction.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from envs.arithmetic import _SPLITS, _is_test, check_chain_settings, evaluate_left_to_right
from envs.base import ReasoningEnv
from envs.rewards import has_closed_boxed, last_boxed

__all__ = ["PlanArithmeticEnv"]

LABELS = "AB"
_INT = re.compile(r"[+-]?\d{1,30}")
_ANSWER = re.compile(r"A:(-?\d+),B:(-?\d+)")


def _chain(operands: list[int], ops: str) -> str:
    return str(operands[0]) + "".join(op + str(b) for op, b in zip(ops, operands[1:], strict=True))


class PlanArithmeticEnv(ReasoningEnv):
    """Two labelled chains per problem, ``short_ops`` and ``long_ops`` operations on operands in
    [operand_min, operand_max]; the answer names one chain on its first line and boxes its value.

    Args:
        short_ops, long_ops: operations of the short and the long chain (1 <= short_ops < long_ops).
        operand_min, operand_max: operand range (non-negative, so the prompt stays unambiguous).
        ops: allowed operators, a non-empty subset of ``"+-*"``.
        split: ``"train"`` or ``"test"`` (disjoint, see module docstring).
        seed: seeds the random problem stream of ``reset()`` and indexes ``problem_index``.
        max_steps: defaults to ``long_ops + 3`` (plan line, operations, answer, one spare line).
        stop_text, max_chars, charset, render_mode: see ReasoningEnv.
    """

    def __init__(
        self,
        *,
        short_ops: int = 2,
        long_ops: int = 5,
        operand_min: int = 1,
        operand_max: int = 9,
        ops: str = "+-",
        split: str = "train",
        seed: int | None = None,
        stop_text: str | None = None,
        max_steps: int | None = None,
        max_chars: int = 4096,
        charset: str | None = None,
        render_mode: str | None = None,
    ) -> None:
        check_chain_settings(
            {
                "short_ops": short_ops,
                "long_ops": long_ops,
                "operand_min": operand_min,
                "operand_max": operand_max,
            },
            ops,
            split,
            seed,
        )
        if short_ops < 1:
            raise ValueError(f"short_ops must be >= 1, got {short_ops}")
        if long_ops <= short_ops:
            raise ValueError(f"long_ops must be > short_ops = {short_ops}, got {long_ops}")
        longest = (short_ops + long_ops + 2) * (len(str(operand_max)) + 1) + 8
        if not isinstance(max_chars, int) or longest > max_chars:
            raise ValueError(f"max_chars = {max_chars!r}: a prompt of these chains needs {longest}")
        self.short_ops, self.long_ops = int(short_ops), int(long_ops)
        self.operand_min, self.operand_max = int(operand_min), int(operand_max)
        self.ops = "".join(sorted(set(ops), key=ops.index))
        self.split = split
        self.problem_seed = 0 if seed is None else int(seed)
        super().__init__(
            stop_text=stop_text,
            max_steps=self.long_ops + 3 if max_steps is None else max_steps,
            max_chars=max_chars,
            charset=charset,
            render_mode=render_mode,
        )
        self._seed_stream(seed)

    # ------------------------------------------------------------------ problem generation
    def _draw_chain(self, rng: np.random.Generator, num_ops: int) -> tuple[list[int], str]:
        operands = rng.integers(self.operand_min, self.operand_max + 1, size=num_ops + 1)
        ops = "".join(rng.choice(list(self.ops), size=num_ops))
        return [int(x) for x in operands], ops

    def _problem_at(self, index: int, split: str, seed: int) -> dict[str, tuple[list[int], str]]:
        """Problem ``index`` of ``(split, seed)``: {label: (operands, ops)}, rejection-sampled into the
        split."""
        rng = np.random.default_rng([seed, _SPLITS[split], index, 2])
        for _ in range(10_000):
            short, long_ = self._draw_chain(rng, self.short_ops), self._draw_chain(rng, self.long_ops)
            chains = dict(zip(LABELS, (short, long_) if rng.random() < 0.5 else (long_, short), strict=True))
            if _is_test(self._prompt_of(chains)) == (split == "test"):
                return chains
        raise RuntimeError(f"could not draw a {split} problem; is the problem space tiny?")

    @staticmethod
    def _prompt_of(chains: dict[str, tuple[list[int], str]]) -> str:
        return "|".join(f"{label}:{_chain(*chain)}" for label, chain in chains.items()) + "=?\n"

    @staticmethod
    def _answer_of(chains: dict[str, tuple[list[int], str]]) -> str:
        return ",".join(f"{label}:{evaluate_left_to_right(*chain)[-1]}" for label, chain in chains.items())

    def short_label(self, prompt: str) -> str:
        """The label of the short chain of a prompt of this env."""
        counts = {m[0]: len(re.findall(r"[-+*]", m[1])) for m in re.findall(r"([AB]):([^|=]+)", prompt)}
        return min(counts, key=counts.get)

    def problems(
        self, n: int, *, split: str | None = None, seed: int | None = None, start: int = 0
    ) -> list[tuple[str, str]]:
        """``(prompt, answer)`` of problems ``start .. start+n-1``; the answer reads ``"A:<int>,B:<int>"``."""
        split = self.split if split is None else split
        seed = self.problem_seed if seed is None else seed
        return [
            (self._prompt_of(c), self._answer_of(c))
            for c in (self._problem_at(i, split, seed) for i in range(start, start + n))
        ]

    def demonstrations(self, n: int, *, seed: int = 0, error_rate: float = 0.0) -> list[tuple[str, str]]:
        """``(prompt, response)`` pairs from the TRAIN split. The plan line picks A or B at random (no
        preference for the short chain); with ``error_rate`` each operation line is independently off by 1-3
        (never back on the true value) and later lines continue from it, so the boxed value is wrong."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        rng = np.random.default_rng([seed, 7919, 2])
        out = []
        for i in range(n):
            chains = self._problem_at(i, "train", seed)
            label = LABELS[int(rng.integers(0, len(LABELS)))]
            operands, ops = chains[label]
            true = evaluate_left_to_right(operands, ops)
            shown, lines = operands[0], [f"{label}\n"]
            for k, (op, b) in enumerate(zip(ops, operands[1:], strict=True)):
                result = evaluate_left_to_right([shown, b], op)[-1]
                if rng.random() < error_rate:
                    delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
                    result += -delta if result + delta == true[k + 1] else delta
                lines.append(f"{shown}{op}{b}={result}\n")
                shown = result
            out.append((self._prompt_of(chains), "".join(lines) + f"\\boxed{{{shown}}}"))
        return out

    # ------------------------------------------------------------------ ReasoningEnv hooks
    def _sample_problem(self, rng: np.random.Generator, options: dict[str, Any]) -> tuple[str, str, str]:
        index = options.get("problem_index")
        if index is None:
            index = int(rng.integers(0, 2**62))
        elif int(index) < 0:
            raise IndexError(f"problem_index must be >= 0, got {index}")
        chains = self._problem_at(int(index), self.split, self.problem_seed)
        prompt = self._prompt_of(chains)
        return prompt[:-3], prompt, self._answer_of(chains)

    def _score(self, response: str, answer: str) -> float:
        values = _ANSWER.fullmatch(answer)
        if values is None:
            raise ValueError(f"answer {answer!r}: expected 'A:<int>,B:<int>' (PlanArithmeticEnv.problems)")
        label = response.split("\n", 1)[0].strip()
        content = last_boxed(response)
        if label not in LABELS or content is None:
            return 0.0
        content = "".join(content.split())
        want = int(values.group(1 + LABELS.index(label)))
        return 1.0 if _INT.fullmatch(content) and int(content) == want else 0.0

    def is_final(self, step_text: str) -> bool:
        """The step closes a ``\\boxed{...}``: the answer line ends the response."""
        return has_closed_boxed(step_text)
