"""Tests of envs/: registration, the environment contract (docs/architecture.md), dataset problems."""

from __future__ import annotations

import json
import warnings

import datasets
import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import MathProblemsEnv, ReasoningEnv

MATH_ROWS = [
    {"problem": "What is half of one?", "answer": "\\frac{1}{2}"},
    {"problem": "Compute 2+2 (π-free).", "answer": "4"},
    {"problem": "Solve x+1=3 for x.", "answer": "2"},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def math_jsonl(tmp_path) -> str:
    return write_jsonl(tmp_path / "problems.jsonl", MATH_ROWS)


def make_registered(env_id: str, math_path: str) -> gymnasium.Env:
    kwargs = {
        "treerpo/MathProblems-v0": {"dataset": math_path},
        "treerpo/ReasoningGym-v0": {"task": "chain_sum", "size": 50},
    }.get(env_id, {})
    return gymnasium.make(env_id, **kwargs)


# ------------------------------------------------------------------------------ registration
REGISTERED = [
    "treerpo/Arithmetic-v0",
    "treerpo/ArithmeticHard-v0",
    "treerpo/MathProblems-v0",
    "treerpo/ReasoningGym-v0",
    "treerpo/PlanArithmetic-v0",
]


def test_every_registered_id_is_checked():
    ours = {i for i in gymnasium.registry if i.startswith("treerpo/")}
    assert ours == set(REGISTERED)


@pytest.mark.parametrize("env_id", REGISTERED)
def test_check_env_passes_without_warnings(env_id, math_jsonl):
    env = make_registered(env_id, math_jsonl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []
    # Random Text actions (any charset character, any length) are accepted through the wrappers.
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert 0.0 <= reward <= 1.0
        done = terminated or truncated
    env.close()


def test_double_import_does_not_reregister():
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(envs)
    assert gymnasium.spec("treerpo/ArithmeticHard-v0").kwargs == {"num_ops": 6, "operand_max": 20}


def test_math_problems_without_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="needs dataset="):
        gymnasium.make("treerpo/MathProblems-v0")


# ------------------------------------------------------------------------------ base contract
class ToyEnv(ReasoningEnv):
    """Fixed problem; reward 1 iff the response ends with the answer; 'END' is the end marker."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def _sample_problem(self, rng, options):
        return "toy", "Q?\n", "ok"

    def _score(self, response, answer):
        return 1.0 if response.strip().endswith(answer) else 0.0

    def is_final(self, step_text):
        return "END" in step_text


def test_reward_only_at_the_end_and_info():
    env = ToyEnv(max_steps=3)
    obs, info = env.reset()
    assert obs == "Q?\n" and info == {"problem_id": "toy", "answer": "ok"}
    obs, r, term, trunc, info = env.step("a ")
    assert (r, term, trunc) == (0.0, False, False)
    assert obs == "Q?\na " and info["response"] == "a " and info["num_steps"] == 1
    obs, r, term, trunc, info = env.step("b ")
    assert (r, term, trunc) == (0.0, False, False)
    obs, r, term, trunc, info = env.step("ok")
    assert (r, term, trunc) == (1.0, False, True)  # scored at truncation like any leaf
    assert info["end_reason"] == "max_steps" and env.done


def test_stop_text_cuts_and_terminates():
    env = ToyEnv(max_steps=5)
    env.stop_text = "</s>"  # the sampler sets it after construction
    env.reset()
    env.step("x ")
    obs, r, term, trunc, info = env.step("ok</s>trailing junk")
    assert term and not trunc and r == 1.0
    assert info["response"] == "x ok" and obs == "Q?\nx ok" and info["end_reason"] == "stop_text"


def test_stop_text_split_across_steps():
    env = ToyEnv(stop_text="</s>", max_steps=5)
    env.reset()
    env.step("ok</")
    _, r, term, _, info = env.step("s>")
    assert term and info["response"] == "ok" and r == 1.0


def test_is_final_terminates_and_keeps_the_step():
    env = ToyEnv(max_steps=5)
    env.reset()
    _, r, term, trunc, info = env.step("ok END")
    assert term and not trunc and info["end_reason"] == "final"
    assert info["response"] == "ok END" and r == 0.0


def test_finish_ends_and_scores_without_a_step():
    env = ToyEnv(max_steps=5)
    env.reset()
    env.step("ok")
    obs, r, term, trunc, info = env.finish()
    assert (obs, r, term, trunc) == ("Q?\nok", 1.0, True, False)
    assert info["end_reason"] == "finish" and info["num_steps"] == 1 and env.done
    with pytest.raises(RuntimeError):
        env.step("x")


def test_step_after_done_and_before_reset_raise():
    env = ToyEnv(max_steps=1)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("a")
    env.reset()
    env.step("a")
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step("b")
    env.reset()  # a new episode is fine
    env.step("c")


def test_max_chars_caps_observation_and_truncates():
    env = ToyEnv(max_chars=10, max_steps=5)
    env.reset()  # prompt has 3 characters, so 7 are left for the response
    obs, _, term, trunc, info = env.step("abcdefghijkl")
    assert trunc and not term and info["end_reason"] == "max_chars"
    assert obs == "Q?\nabcdefg" and env.observation_space.contains(obs)


def test_clone_is_independent_both_ways():
    env = ToyEnv(max_steps=4)
    env.reset()
    env.step("a ")
    twin = env.clone()
    twin.step("b ")
    assert env.response == "a " and twin.response == "a b " and env.num_steps == 1
    env.step("c ")
    assert twin.response == "a b " and env.response == "a c "
    twin.step("ok END")
    assert twin.done and not env.done
    env.step("d ")  # the original can still go on


def test_clone_shares_problem_data(math_jsonl):
    env = MathProblemsEnv(dataset=math_jsonl)
    env.reset(seed=0)
    twin = env.clone()
    assert twin._rows is env._rows and twin.observation_space is env.observation_space
    # The random stream is copied, not shared: resets of a clone do not advance the original.
    a = [twin.reset()[1]["problem_id"] for _ in range(5)]
    b = [env.reset()[1]["problem_id"] for _ in range(5)]
    assert a == b


# ------------------------------------------------------------------------------ math problems
def test_math_problems_from_jsonl(math_jsonl):
    env = MathProblemsEnv(dataset=math_jsonl, prompt_template="Problem: {problem}\nAnswer:")
    assert env.num_problems == 3 and env.num_skipped_rows == 0
    prompt, info = env.reset(options={"problem_index": 0})
    assert prompt == "Problem: What is half of one?\nAnswer:" and info["problem_id"] == "train/0"
    assert "π" in env.charset and env.observation_space.contains(env.reset(options={"problem_index": 1})[0])
    env.reset(options={"problem_index": 0})
    _, r, term, _, _ = env.step(" It is \\boxed{0.5}")
    assert term and r == 1.0
    env.reset(options={"problem_index": 0})
    _, r, term, _, _ = env.step(" It is \\boxed{1/3} ")
    assert term and r == 0.0
    with pytest.raises(IndexError):
        env.reset(options={"problem_index": 3})


def test_math_problems_missing_file_is_one_line(tmp_path):
    for path in (str(tmp_path / "nope.jsonl"), "./nope"):
        with pytest.raises(ValueError, match=r"^env_config field 'dataset' = .*: no such file$"):
            MathProblemsEnv(dataset=path)


def test_math_problems_from_csv_and_dataset(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("question,solution\nWhat is 6*7?,42\nWhat is 1+1?,2\n")
    env = MathProblemsEnv(dataset=str(csv), problem_column="question", answer_column="solution")
    assert env.problems() == [("What is 6*7?\n", "42"), ("What is 1+1?\n", "2")]  # ints become str
    ds = datasets.Dataset.from_list(MATH_ROWS)
    env = MathProblemsEnv(dataset=ds, seed=0)
    ids = {env.reset()[1]["problem_id"] for _ in range(30)}
    assert ids == {"train/0", "train/1", "train/2"}
    dd = datasets.DatasetDict({"test": ds.select([2])})
    env = MathProblemsEnv(dataset=dd, split="test")
    assert env.reset()[1] == {"problem_id": "test/0", "answer": "2"}
    # a one-element list of answers (OlympiadBench's final_answer) is that answer
    listed = datasets.Dataset.from_list([{"question": "x?", "final_answer": ["$3$"]}])
    env = MathProblemsEnv(dataset=listed, problem_column="question", answer_column="final_answer")
    assert env.problems() == [("x?\n", "$3$")]


def test_math_problems_missing_column_names_it(math_jsonl):
    with pytest.raises(ValueError, match=r"'question'.*available columns.*'problem'"):
        MathProblemsEnv(dataset=math_jsonl, problem_column="question")


def test_math_problems_bad_rows(tmp_path):
    rows = MATH_ROWS + [
        {"problem": "Unanswerable", "answer": "\\boxed{}"},  # math-verify parses nothing
        {"problem": "   ", "answer": "3"},
        {"problem": "No answer", "answer": ""},
        {"problem": "Garbage gold", "answer": "???"},  # only math-verify's raw-string fallback
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad row 3: column 'answer'.*cannot parse"):
        MathProblemsEnv(dataset=path)
    with pytest.raises(ValueError, match=r"bad row 4: column 'problem'"):
        MathProblemsEnv(dataset=path, validate_answers=False)
    env = MathProblemsEnv(dataset=path, on_bad_row="skip")
    assert env.num_skipped_rows == 4 and env.num_problems == 3
    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", rows[3:])
    with pytest.raises(ValueError, match="no usable rows"):
        MathProblemsEnv(dataset=only_bad, on_bad_row="skip")


def test_math_problems_argument_errors(math_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"\{problem\}"):
        MathProblemsEnv(dataset=math_jsonl, prompt_template="Q: {question}")
    with pytest.raises(ValueError, match="on_bad_row"):
        MathProblemsEnv(dataset=math_jsonl, on_bad_row="ignore")
    txt = tmp_path / "p.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="supported file types"):
        MathProblemsEnv(dataset=str(txt))
    with pytest.raises(ValueError, match="max_chars"):
        MathProblemsEnv(dataset=math_jsonl, max_chars=10)
