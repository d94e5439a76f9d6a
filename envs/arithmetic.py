"""Synthetic multi-step arithmetic: the embedded default task (no downloads).

Format (compact: every character is one token for the tiny char-level models):

- prompt: the expression then ``=?`` and a newline, e.g. ``"7+5-3=?\\n"``. Evaluation is strictly
  LEFT TO RIGHT with no operator precedence (``2+3*4`` means ``(2+3)*4 = 20``), so every operation
  is one reasoning step.
- response: one line per operation, each ending with ``"\\n"``, then the final line
  ``\\boxed{ANSWER}``: ``"7+5=12\\n12-3=9\\n\\boxed{9}"``. One line is one tree step, so
  ``step_delimiter="\\n"`` cuts steps at operations.
- reward: a FAST exact check, 1.0 iff the content of the last closed ``\\boxed{...}`` (spaces
  removed) is an integer equal to the answer; no math-verify, because a tree scores thousands of
  leaves per iteration.

Problems are a deterministic function of ``(seed, split, index)``; a problem belongs to the test
split iff a stable hash of its expression is 0 mod 10, so the splits are disjoint by construction.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from envs.base import ReasoningEnv
from envs.rewards import has_closed_boxed, last_boxed

__all__ = ["ArithmeticEnv", "evaluate_left_to_right"]

_SPLITS = {"train": 0, "test": 1}
_INT = re.compile(r"[+-]?\d{1,30}")


def evaluate_left_to_right(operands: list[int], ops: str) -> list[int]:
    """Running values of ``operands[0] ops[0] operands[1] ...`` evaluated left to right."""
    values = [operands[0]]
    for op, b in zip(ops, operands[1:], strict=True):
        a = values[-1]
        values.append(a + b if op == "+" else a - b if op == "-" else a * b)
    return values


def check_chain_settings(integers: dict[str, Any], ops: Any, split: Any, seed: Any) -> None:
    """The settings every arithmetic-chain env shares: integer counts and operands (``operand_min`` <=
    ``operand_max``), the operators, the split, the seed; one ValueError naming the first bad one."""
    for name, value in integers.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 or null, got {seed!r}")
    if not 0 <= integers["operand_min"] <= integers["operand_max"]:
        raise ValueError(
            f"need 0 <= operand_min <= operand_max, got {integers['operand_min']}, {integers['operand_max']}"
        )
    try:
        bad_ops = not ops or bool(set(ops) - set("+-*"))
    except TypeError:  # not a collection of operator characters
        bad_ops = True
    if bad_ops:
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")


def _is_test(expr: str) -> bool:
    digest = hashlib.blake2b(expr.encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 10 == 0


class ArithmeticEnv(ReasoningEnv):
    """Left-to-right arithmetic with ``num_ops`` operations on operands in [operand_min, operand_max].

    Args:
        num_ops: operations per problem (= reasoning lines before the boxed answer).
        operand_min, operand_max: operand range (non-negative, so the prompt stays unambiguous).
        ops: allowed operators, a non-empty subset of ``"+-*"``.
        split: ``"train"`` or ``"test"`` (disjoint, see module docstring).
        seed: seeds the random problem stream of ``reset()`` and indexes ``problem_index``
            (``None``: random stream, index seed 0).
        max_steps: defaults to ``num_ops + 2`` (one spare line).
        stop_text, max_chars, charset, render_mode: see ReasoningEnv.

    ``reset(options={"problem_index": i})`` returns problem ``i`` of ``problems(i + 1)``, the same
    for every env with equal knobs: that is the held-out evaluation set.
    """

    def __init__(
        self,
        *,
        num_ops: int = 3,
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
            {"num_ops": num_ops, "operand_min": operand_min, "operand_max": operand_max}, ops, split, seed
        )
        if num_ops < 1:
            raise ValueError(f"num_ops must be >= 1, got {num_ops}")
        longest = (num_ops + 1) * (len(str(operand_max)) + 1) + 3  # "a+b-...=?\n", the widest operands
        if not isinstance(max_chars, int) or longest > max_chars:
            raise ValueError(
                f"num_ops = {num_ops} with operand_max = {operand_max}: a prompt exceeds max_chars"
            )
        self.num_ops = int(num_ops)
        self.operand_min, self.operand_max = int(operand_min), int(operand_max)
        self.ops = "".join(sorted(set(ops), key=ops.index))
        self.split = split
        self.problem_seed = 0 if seed is None else int(seed)
        super().__init__(
            stop_text=stop_text,
            max_steps=self.num_ops + 2 if max_steps is None else max_steps,
            max_chars=max_chars,
            charset=charset,
            render_mode=render_mode,
        )
        self._seed_stream(seed)

    # ------------------------------------------------------------------ problem generation
    def _draw(self, rng: np.random.Generator) -> tuple[list[int], str]:
        operands = rng.integers(self.operand_min, self.operand_max + 1, size=self.num_ops + 1)
        ops = "".join(rng.choice(list(self.ops), size=self.num_ops))
        return [int(x) for x in operands], ops

    def _problem_at(self, index: int, split: str, seed: int) -> tuple[list[int], str, str]:
        """Problem ``index`` of ``(split, seed)``: rejection-sample until it lands in the split."""
        rng = np.random.default_rng([seed, _SPLITS[split], index])
        want_test = split == "test"
        for _ in range(10_000):
            operands, ops = self._draw(rng)
            expr = self._expr(operands, ops)
            if _is_test(expr) == want_test:
                return operands, ops, expr
        raise RuntimeError(f"could not draw a {split} problem; is the problem space tiny?")

    @staticmethod
    def _expr(operands: list[int], ops: str) -> str:
        return str(operands[0]) + "".join(op + str(b) for op, b in zip(ops, operands[1:], strict=True))

    def problems(
        self, n: int, *, split: str | None = None, seed: int | None = None, start: int = 0
    ) -> list[tuple[str, str]]:
        """``(prompt, answer)`` of problems ``start .. start+n-1`` of a split (default: the env's)."""
        split = self.split if split is None else split
        seed = self.problem_seed if seed is None else seed
        out = []
        for i in range(start, start + n):
            operands, ops, expr = self._problem_at(i, split, seed)
            out.append((f"{expr}=?\n", str(evaluate_left_to_right(operands, ops)[-1])))
        return out

    def demonstrations(self, n: int, *, seed: int = 0, error_rate: float = 0.0) -> list[tuple[str, str]]:
        """``(prompt, response)`` pairs from the TRAIN split, in the exact response format.

        With ``error_rate`` each line's result is independently wrong with that probability (off by
        1-3, never accidentally right again), and later lines continue from the wrong value, so
        the boxed answer is wrong: a warm start on these is imperfect and leaves RL room to improve.
        (With operand 0 and ``*`` an earlier error can be multiplied away; the last line's cannot.)
        """
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        err_rng = np.random.default_rng([seed, 7919])
        out = []
        for i in range(n):
            operands, ops, expr = self._problem_at(i, "train", seed)
            true = evaluate_left_to_right(operands, ops)
            shown = operands[0]
            lines = []
            for k, (op, b) in enumerate(zip(ops, operands[1:], strict=True)):
                result = evaluate_left_to_right([shown, b], op)[-1]
                if err_rng.random() < error_rate:
                    delta = int(err_rng.integers(1, 4)) * (1 if err_rng.random() < 0.5 else -1)
                    if result + delta == true[k + 1]:  # never land back on the true value
                        delta = -delta
                    result += delta
                lines.append(f"{shown}{op}{b}={result}\n")
                shown = result
            out.append((f"{expr}=?\n", "".join(lines) + f"\\boxed{{{shown}}}"))
        return out

    # ------------------------------------------------------------------ ReasoningEnv hooks
    def _sample_problem(self, rng: np.random.Generator, options: dict[str, Any]) -> tuple[str, str, str]:
        index = options.get("problem_index")
        if index is None:
            index = int(rng.integers(0, 2**62))  # a random member of the same indexed family
        elif int(index) < 0:
            raise IndexError(f"problem_index must be >= 0, got {index}")
        operands, ops, expr = self._problem_at(int(index), self.split, self.problem_seed)
        return expr, f"{expr}=?\n", str(evaluate_left_to_right(operands, ops)[-1])

    def _score(self, response: str, answer: str) -> float:
        content = last_boxed(response)
        if content is None:
            return 0.0
        content = "".join(content.split())
        return 1.0 if _INT.fullmatch(content) and int(content) == int(answer) else 0.0

    def is_final(self, step_text: str) -> bool:
        """The step closes a ``\\boxed{...}``: the answer line ends the response."""
        return has_closed_boxed(step_text)
