"""Answers as real models write them (envs/answers.py), and the envs that score them (answer_format)."""

from __future__ import annotations

import pytest

from envs import MathProblemsEnv
from envs.answers import ANSWER_FORMATS, check_answer_format, extract_answer, has_final_answer
from tests.envs.test_envs import MATH_ROWS, write_jsonl

ALL = ("boxed", "answer_tag", "answer_is")


@pytest.mark.parametrize(
    "response,formats,answer",
    [
        ("So \\boxed{12}.", ("boxed",), "12"),
        ("\\boxed{1} then \\boxed{ 42 }", ("boxed",), "42"),
        ("\\boxed{\\frac{1}{2}}", ("boxed",), "\\frac{1}{2}"),
        ("{ \\boxed{3} }} \\boxed{4", ("boxed",), "3"),  # an unclosed box is no answer
        ("\\boxed{\\boxed{3}}", ("boxed",), "3"),
        ("The answer is 12.", ("boxed",), None),  # the default: boxes only
        ("The answer is 12.", ALL, "12"),
        ("Let me think... 7 + 5 = 12.\nThe final answer is $12$.", ALL, "12"),
        ("The final answer is $\\boxed{\\frac{1}{2}}$.", ("answer_is",), "\\frac{1}{2}"),
        ("**Answer:** $\\frac{1}{2}$", ALL, "\\frac{1}{2}"),
        ("Answer: **42**", ALL, "42"),
        ("Answer: 3.14.", ALL, "3.14"),
        ("The answer is: \\(x = 5\\)", ALL, "x = 5"),
        ("Final Answer: The final answer is 7. I hope it is correct.", ALL, "7"),
        ("So the answer is 5\nActually, the answer is 6", ALL, "6"),
        ("<answer> 42 </answer>", ("answer_tag",), "42"),
        ("<ANSWER>\n7\n</ANSWER> done", ALL, "7"),
        ("<answer>42", ALL, None),
        ("\\boxed{8}\nThe answer is 9.", ALL, "9"),  # the answer that ends last wins
        ("The answer is 9.\n\\boxed{8}", ALL, "8"),
        ("the answer isn't clear", ALL, None),
        ("Let me answer this question.", ALL, None),
        ("Answer:\n", ALL, None),
        ("", ALL, None),
        ("7 + 5 = 12<|im_end|>", ("last_number",), "12"),
        ("So 1,234 - 34 = 1,200.", ("last_number",), "1200"),
        ("1/2 + 1/4 = 3/4", ("last_number",), "3/4"),
        ("It is -3.5!", ("last_number",), "-3.5"),
        ("\\boxed{8}, I mean 9", ("boxed", "last_number"), "9"),
        ("no digits", ("last_number",), None),
    ],
)
def test_extract_answer(response, formats, answer):
    assert extract_answer(response, formats) == answer


@pytest.mark.parametrize(
    "step,formats,final",
    [
        ("so \\boxed{-3}\n", ("boxed",), True),
        ("\\boxed{12", ("boxed",), False),
        ("7+5=12\n", ALL, False),
        ("<answer>12</answer>", ("answer_tag",), True),
        ("<answer>12</answer>", ("boxed",), False),
        ("The answer is 12.\n", ("answer_is",), True),
        ("The answer is 1", ("answer_is",), False),  # the line may go on ("12"): not the end yet
        ("Answer: 12\n", ALL, True),
        ("I will answer soon.\n", ALL, False),
        ("7 + 5 = 12\n", ANSWER_FORMATS, False),  # a number is no end marker
    ],
)
def test_has_final_answer(step, formats, final):
    assert has_final_answer(step, formats) == final


def test_answer_format_values():
    assert check_answer_format(None) == ("boxed",) and check_answer_format("answer_is") == ("answer_is",)
    assert check_answer_format(["boxed", "answer_tag", "boxed"]) == ("boxed", "answer_tag")
    assert "last_number" in ANSWER_FORMATS
    for bad in ("boxes", ["boxed", "json"], [], 3):
        with pytest.raises(ValueError, match="'answer_format'"):
            check_answer_format(bad)


def test_extraction_is_linear_in_the_response():
    import time

    start = time.perf_counter()
    assert extract_answer("\\boxed{" * 50_000 + "x", ALL) is None
    assert extract_answer("answer: 1\n" * 20_000 + "\\boxed{2}", ALL) == "2"
    assert time.perf_counter() - start < 2.0


def test_math_problems_env_scores_the_extracted_answer(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", MATH_ROWS)
    env = MathProblemsEnv(dataset=path, answer_format=["boxed", "answer_tag", "answer_is"])
    env.reset(options={"problem_index": 0})  # gold 1/2
    _, reward, terminated, _, info = env.step("Half of one is 0.5.\nThe answer is 0.5.\n")
    assert (reward, terminated, info["end_reason"]) == (1.0, True, "final")
    env.reset(options={"problem_index": 0})
    assert env.step("<answer>\\frac{2}{4}</answer>")[1:3] == (1.0, True)
    env.reset(options={"problem_index": 0})
    assert env.step("\\boxed{0.5}\nWait, the answer is 1/3.\n")[1] == 0.0  # the last answer counts
    boxed = MathProblemsEnv(dataset=path, answer_format="boxed")  # "the answer is" is no answer and no end
    boxed.reset(options={"problem_index": 1})
    _, reward, terminated, _, _ = boxed.step("The answer is 4.\n")
    assert not terminated and boxed.finish()[1] == 0.0
    boxed.reset(options={"problem_index": 1})
    assert boxed.step("\\boxed{3} no, \\boxed{4}")[1:3] == (1.0, True)
    default = MathProblemsEnv(dataset=path)  # math-verify on the whole response: its last expression counts
    default.reset(options={"problem_index": 1})
    _, reward, terminated, _, _ = default.step("2 + 2 = 4\n")
    assert not terminated and default.finish()[1] == 1.0
    lenient = MathProblemsEnv(dataset=path, answer_format="last_number")
    lenient.reset(options={"problem_index": 1})
    _, reward, terminated, _, _ = lenient.step("2 + 2 = 4\n")
    assert (reward, terminated) == (0.0, False) and lenient.finish()[1] == 1.0
    with pytest.raises(ValueError, match="answer_format"):
        MathProblemsEnv(dataset=path, answer_format="json")


def test_reasoning_gym_env_answer_formats():
    pytest.importorskip("reasoning_gym")
    from envs.reasoning_gym import ReasoningGymEnv

    env = ReasoningGymEnv(task="basic_arithmetic", size=10, test_size=5, answer_format=["boxed", "answer_is"])
    _, info = env.reset(options={"problem_index": 0})
    _, reward, terminated, _, _ = env.step(f"Step by step...\nFinal Answer: {info['answer']}\n")
    assert (reward, terminated) == (1.0, True)
    tagged = ReasoningGymEnv(task="basic_arithmetic", size=10, test_size=5, answer_format="answer_tag")
    tagged.reset(options={"problem_index": 0})
    assert tagged.step(f"\\boxed{{{info['answer']}}}")[2] is False  # a box is not this env's answer form
    assert tagged.step(f"<answer>{info['answer']}</answer>")[1:3] == (1.0, True)
