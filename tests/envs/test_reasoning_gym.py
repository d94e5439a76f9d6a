"""treerpo/ReasoningGym-v0: any reasoning-gym task as a ReasoningEnv (envs/reasoning_gym.py)."""

from __future__ import annotations

import warnings

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

pytest.importorskip("reasoning_gym")

import envs  # noqa: E402,F401  registers the ids
from envs.reasoning_gym import DEFAULT_PROMPT_TEMPLATE, ReasoningGymEnv, extract_answer  # noqa: E402

ENV_ID = "treerpo/ReasoningGym-v0"
TASKS = ["basic_arithmetic", "chain_sum", "leg_counting"]


def make(task, **kwargs):
    return gymnasium.make(ENV_ID, task=task, size=kwargs.pop("size", 50), **kwargs)


@pytest.mark.parametrize("task", TASKS)
def test_check_env_and_random_steps(task):
    env = make(task, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []
    env.action_space.seed(0)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs.startswith(str(env.unwrapped.entry["question"]))
    done = False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert 0.0 <= reward <= 1.0
        done = terminated or truncated


@pytest.mark.parametrize("task", TASKS)
def test_right_answer_scores_one_wrong_answer_zero(task):
    env = make(task, seed=2)
    for index in range(3):
        prompt, info = env.reset(options={"problem_index": index})
        assert "\\boxed{ANSWER}" in prompt  # the policy is told the answer format
        _, reward, terminated, _, step_info = env.step(f"Let me think.\nSo \\boxed{{ {info['answer']} }}")
        assert (reward, terminated, step_info["end_reason"]) == (1.0, True, "final")

        env.reset(options={"problem_index": index})
        wrong = str(int(info["answer"]) + 1)  # every one of these tasks has an integer answer
        assert env.step(f"\\boxed{{{wrong}}}")[1] == 0.0

        env.reset(options={"problem_index": index})  # no box: no final answer, even if the number is there
        _, reward, _, truncated, _ = env.step(f"the answer is {info['answer']}")
        for _ in range(env.unwrapped.max_steps - 1):
            _, reward, _, truncated, _ = env.step(" hmm")
        assert truncated and reward == 0.0


def test_last_box_is_the_answer():
    assert extract_answer("\\boxed{1} then \\boxed{ 42 }") == "42"
    assert extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{7") is None and extract_answer("no box") is None


def test_problem_index_is_deterministic_and_splits_are_disjoint():
    a = make("chain_sum", seed=5, split="test", test_size=20).unwrapped
    b = make("chain_sum", seed=5, split="test", test_size=20).unwrapped
    test = [a.reset(options={"problem_index": i})[0] for i in range(20)]
    assert test == [b.reset(options={"problem_index": i})[0] for i in range(20)]
    train_env = make("chain_sum", seed=5, size=300, test_size=20).unwrapped
    train = [train_env.reset(options={"problem_index": i})[0] for i in range(300)]
    assert not set(test) & set(train)
    assert a.num_problems == 20 and train_env.num_problems == 300
    with pytest.raises(IndexError, match="out of range"):
        a.reset(options={"problem_index": 20})
    assert a.reset(options={"problem_index": 3})[1]["problem_id"] == "chain_sum/test/3"


def test_task_config_and_prompt_template():
    env = make(
        "basic_arithmetic",
        task_config={"min_terms": 2, "max_terms": 2},
        seed=0,
        prompt_template="Q: {question}\nA: \\boxed{}\n",
    ).unwrapped
    prompt, _ = env.reset(options={"problem_index": 0})
    assert prompt.startswith("Q: ") and env.entry["metadata"]["num_terms"] == 2
    assert "{question}" in DEFAULT_PROMPT_TEMPLATE


def test_clone_keeps_the_problem_and_scores_independently():
    env = ReasoningGymEnv(task="chain_sum", size=10, seed=0)
    _, info = env.reset(options={"problem_index": 4})
    twin = env.clone()
    assert twin.step(f"\\boxed{{{info['answer']}}}")[1] == 1.0
    assert env.step("\\boxed{x}")[1] == 0.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown reasoning-gym task 'chainsum'.*'chain_sum'"):
        gymnasium.make(ENV_ID, task="chainsum")
    with pytest.raises(ValueError, match=r"'basic_arithmetc'.*did you mean 'basic_arithmetic'"):
        gymnasium.make(ENV_ID, task="basic_arithmetc")
    with pytest.raises(ValueError, match="needs task=.*chain_sum"):
        gymnasium.make(ENV_ID)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\].*min_terms"):
        make("chain_sum", task_config={"bogus": 1})
    with pytest.raises(ValueError, match="max_terms"):
        make("chain_sum", task_config={"min_terms": 5, "max_terms": 2})
    with pytest.raises(ValueError, match="split"):
        make("chain_sum", split="validation")
    with pytest.raises(ValueError, match="prompt_template"):
        make("chain_sum", prompt_template="no placeholder")


def test_make_reasoning_env_accepts_the_id():
    from envs import make_reasoning_env

    env = make_reasoning_env(ENV_ID, {"task": "chain_sum", "size": 5})
    assert isinstance(env, ReasoningGymEnv) and env.task == "chain_sum"
