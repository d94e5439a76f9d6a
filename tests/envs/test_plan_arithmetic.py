"""The planning-choice arithmetic env: prompts, answers, the verifier, demonstrations, splits, bad input."""

from __future__ import annotations

import re

import pytest

from envs import PlanArithmeticEnv, make_reasoning_env


def chain_value(chain: str) -> int:
    """Left-to-right value of ``"7+5-3"``, written separately from the env."""
    tokens = re.findall(r"\d+|[-+*]", chain)
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        value = {"+": value + int(num), "-": value - int(num), "*": value * int(num)}[op]
    return value


def parse(prompt: str) -> dict[str, str]:
    m = re.fullmatch(r"A:([-+*\d]+)\|B:([-+*\d]+)=\?\n", prompt)
    assert m, prompt
    return {"A": m.group(1), "B": m.group(2)}


def solve(chain: str, label: str) -> str:
    """A correct response for one chain."""
    tokens = re.findall(r"\d+|[-+*]", chain)
    value, lines = int(tokens[0]), [label + "\n"]
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        new = chain_value(f"{value}{op}{num}") if value >= 0 else chain_value(f"0-{-value}{op}{num}")
        lines.append(f"{value}{op}{num}={new}\n")
        value = new
    return "".join(lines) + f"\\boxed{{{value}}}"


def run(env: PlanArithmeticEnv, response: str) -> float:
    for line in response.splitlines(keepends=True):
        _, reward, term, trunc, info = env.step(line)
    assert term and not trunc and info["end_reason"] == "final"
    return reward


@pytest.mark.parametrize("kwargs", [{}, {"short_ops": 1, "long_ops": 3, "operand_max": 20, "ops": "+-*"}])
def test_prompts_hold_one_short_and_one_long_chain(kwargs):
    env = PlanArithmeticEnv(seed=3, **kwargs)
    short_ops, long_ops = kwargs.get("short_ops", 2), kwargs.get("long_ops", 5)
    first = []
    for prompt, answer in env.problems(300):
        chains = parse(prompt)
        lengths = sorted(len(re.findall(r"[-+*]", c)) for c in chains.values())
        assert lengths == [short_ops, long_ops]
        assert answer == f"A:{chain_value(chains['A'])},B:{chain_value(chains['B'])}"
        assert len(re.findall(r"[-+*]", chains[env.short_label(prompt)])) == short_ops
        first.append(env.short_label(prompt))
    assert 0.35 < first.count("A") / len(first) < 0.65  # the short chain is not always first
    assert env.max_steps == long_ops + 3


def test_verifier_pays_the_chosen_chain_only():
    env = PlanArithmeticEnv(seed=0)
    for index in range(40):
        env.reset(options={"problem_index": index})
        chains = parse(env.prompt)
        for label in "AB":
            env.reset(options={"problem_index": index})
            assert run(env, solve(chains[label], label)) == 1.0
        values = {k: chain_value(v) for k, v in chains.items()}
        other = {"A": "B", "B": "A"}
        for label in "AB":
            if values[label] == values[other[label]]:
                continue
            # the right plan line with the other chain's value, and a wrong value: both fail
            wrong = solve(chains[other[label]], other[label]).replace(other[label] + "\n", label + "\n", 1)
            assert env._score(wrong, env.answer) == 0.0
            off = solve(chains[label], label).rsplit("{", 1)[0] + f"{{{values[label] + 1}}}"
            assert env._score(off, env.answer) == 0.0
        right = solve(chains["A"], "A")
        assert env._score(right.split("\n", 1)[1], env.answer) == 0.0  # no plan line
        assert env._score("C\n" + right.split("\n", 1)[1], env.answer) == 0.0
        assert env._score(right.rsplit("\\boxed", 1)[0], env.answer) == 0.0  # no boxed answer
        assert env._score(right.replace("\\boxed{", "\\boxed{ "), env.answer) == 1.0


def test_answer_string_is_checked():
    env = PlanArithmeticEnv(seed=0)
    with pytest.raises(ValueError, match="expected 'A:<int>,B:<int>'"):
        env._score("A\n\\boxed{1}", "1")


@pytest.mark.parametrize("error_rate,expected", [(0.0, 1.0), (1.0, 0.0)])
def test_demonstrations_score_through_the_env(error_rate, expected):
    env = PlanArithmeticEnv(seed=0)
    train = dict(env.problems(200, split="train"))
    demos = env.demonstrations(200, error_rate=error_rate)
    labels = []
    for prompt, response in demos:
        assert prompt in train
        env.reset(options={"problem_index": list(train).index(prompt)})
        assert env.prompt == prompt
        assert run(env, response) == expected
        labels.append(response[0] == env.short_label(prompt))
    assert 0.35 < sum(labels) / len(labels) < 0.65  # no preference for the short chain


def test_demonstration_errors_are_per_line():
    env = PlanArithmeticEnv(seed=0)
    demos = env.demonstrations(2000, error_rate=0.2)
    solved = {True: [], False: []}
    for prompt, response in demos:
        answer = env._answer_of(env._problem_at(demos.index((prompt, response)), "train", 0))
        solved[response[0] == env.short_label(prompt)].append(env._score(response, answer))
    short, long_ = (sum(v) / len(v) for v in (solved[True], solved[False]))
    assert abs(short - 0.8**2) < 0.05 and abs(long_ - 0.8**5) < 0.05


def test_splits_are_disjoint_and_deterministic():
    env = PlanArithmeticEnv(seed=0)
    train = [p for p, _ in env.problems(3000, split="train")]
    test = [p for p, _ in env.problems(1000, split="test")]
    assert not set(train) & set(test)
    assert test == [p for p, _ in PlanArithmeticEnv(seed=0, split="test").problems(1000)]
    assert test != [p for p, _ in PlanArithmeticEnv(seed=1, split="test").problems(1000)]


@pytest.mark.parametrize(
    "config,field",
    [
        ({"long_ops": 2}, "long_ops"),
        ({"short_ops": 0}, "short_ops"),
        ({"short_ops": "2"}, "short_ops"),
        ({"ops": "+/"}, "ops"),
        ({"split": "dev"}, "split"),
        ({"operand_min": 5, "operand_max": 3}, "operand_min"),
        ({"seed": -1}, "seed"),
        ({"max_chars": 10}, "max_chars"),
    ],
)
def test_bad_input_names_the_argument(config, field):
    with pytest.raises(ValueError, match=field) as e:
        make_reasoning_env("treerpo/PlanArithmetic-v0", config)
    assert "env_config" in str(e.value) and "\n" not in str(e.value)


def test_registered_and_clonable():
    env = make_reasoning_env("treerpo/PlanArithmetic-v0", {"split": "test", "seed": 0})
    assert isinstance(env, PlanArithmeticEnv)
    env.reset(options={"problem_index": 5})
    twin = env.clone()
    chains = parse(env.prompt)
    label = env.short_label(env.prompt)
    assert run(twin, solve(chains[label], label)) == 1.0
    assert env.response == ""
