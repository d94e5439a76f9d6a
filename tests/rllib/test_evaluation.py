"""RLlib's evaluation settings inside TreeRPO: held-out metrics under `evaluation/`, the same numbers as
`treerpo eval`, nothing evaluated (and training unchanged) without an interval, Tune selecting on them."""

import pytest
import torch

from tests.rllib.test_algorithm import small_config

EVAL = {"evaluation_interval": 1, "evaluation_duration": 6, "evaluation_samples": 3}


def _learner_weights(algo):
    from rllib_treerpo.rllib.rl_module import learner_policy_weights

    return {k: torch.as_tensor(v).clone() for k, v in learner_policy_weights(algo).items()}


def test_train_returns_held_out_metrics_equal_to_treerpo_eval(tiny_lm_dir, tmp_path):
    """evaluation_interval=1: algo.train() reports pass@1, pass@3, greedy accuracy and length under
    `evaluation`, of the weights after that iteration; `treerpo eval` of a checkpoint of those weights, with
    the same seed, samples and problems, gives the same numbers (one evaluation path)."""
    from rllib_treerpo.jobs.eval import eval_model

    algo = small_config(tiny_lm_dir, **EVAL).build_algo()
    try:
        result = algo.train()
        ev = result["evaluation"]
        assert ev["iteration"] == 1 and ev["problems"] == 6 and ev["samples"] == 3
        for key in ("pass@1", "pass@3", "greedy_accuracy", "mean_response_tokens", "seconds"):
            assert key in ev, key
        assert ev["env_runners"]["episode_return_mean"] == ev["mean_reward"]
        algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    summary = eval_model(
        str(tmp_path / "ckpt"), problems=6, samples=3, seed=0, output=str(tmp_path / "eval"), progress=False
    )
    for key in ("pass@1", "pass@3", "greedy_accuracy", "mean_response_tokens"):
        assert summary[key] == pytest.approx(ev[key]), key


def test_without_an_interval_nothing_is_evaluated_and_training_is_unchanged(tiny_lm_dir):
    """No evaluation_interval: no `evaluation` key and no evaluation runners; with one, the training
    iterations are the same (evaluation never touches the training env, seeds or weights)."""
    runs = {}
    for name, extra in (("plain", {}), ("evaluated", EVAL)):
        algo = small_config(tiny_lm_dir, **extra).build_algo()
        try:
            results = [algo.train() for _ in range(2)]
            runs[name] = (results, _learner_weights(algo))
            assert algo.eval_env_runner_group is None
        finally:
            algo.stop()
    plain, evaluated = runs["plain"], runs["evaluated"]
    assert all("evaluation" not in r for r in plain[0])
    assert [r["evaluation"]["iteration"] for r in evaluated[0]] == [1, 2]
    for a, b in zip(plain[0], evaluated[0], strict=True):
        for key in ("reward/mean", "tree/generated_tokens", "loss/optimizer_steps"):
            assert a[key] == b[key], key
    assert all(torch.equal(plain[1][k], evaluated[1][k]) for k in plain[1])


def test_every_result_carries_the_latest_evaluation(tiny_lm_dir):
    """evaluation_interval=2: the first step also evaluates the starting policy (iteration 0), so every
    result has `evaluation/pass@1` (what Tune's metric check needs), and `iteration` says when it was
    measured."""
    algo = small_config(tiny_lm_dir, **{**EVAL, "evaluation_interval": 2}).build_algo()
    try:
        seen = [algo.train()["evaluation"]["iteration"] for _ in range(3)]
    finally:
        algo.stop()
    assert seen == [0, 2, 2]


def test_dedicated_evaluation_runners_give_the_same_numbers(tiny_lm_dir, ray_session):
    """evaluation_num_env_runners=2 (remote runners, given the learners' weights) and a remote training
    runner evaluating: both equal the local runner's evaluation of the same weights; the held-out
    problems are split in the evaluator's batches, so the runner count does not change the numbers."""
    evals = {}
    cases = {
        "local": {},
        "remote training runner": {"num_env_runners": 1},
        "2 evaluation runners": {"evaluation_num_env_runners": 2},
    }
    for name, extra in cases.items():
        algo = small_config(tiny_lm_dir, **{**EVAL, "evaluation_duration": 60}, **extra).build_algo()
        try:
            evals[name] = algo.evaluate()
            assert (algo.eval_env_runner_group is not None) == ("evaluation_num_env_runners" in extra)
        finally:
            algo.stop()
    base = evals["local"]
    assert base["problems"] == 60
    for name, ev in evals.items():
        for key in ("pass@1", "greedy_accuracy", "mean_response_tokens"):
            assert ev[key] == pytest.approx(base[key]), (name, key)


def test_evaluation_env_merges_overrides_over_the_training_env_config(tiny_lm_dir):
    config = small_config(tiny_lm_dir, **EVAL)
    config.evaluation(evaluation_config={"env_config": {"split": "test"}, "evaluation_samples": 5})
    eval_config = config.get_evaluation_config_object()
    assert eval_config.env_config == {"num_ops": 1, "split": "test"}
    assert eval_config.evaluation_samples == 5
    off = small_config(tiny_lm_dir).get_evaluation_config_object()  # no evaluation: the training env
    assert off.env_config == {"num_ops": 1}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"evaluation_duration": "auto"}, "'evaluation_duration' = 'auto'"),
        ({"evaluation_duration_unit": "timesteps"}, "'evaluation_duration_unit' = 'timesteps'"),
        ({"evaluation_parallel_to_training": True}, "'evaluation_parallel_to_training' = True"),
        ({"evaluation_samples": 0}, "'evaluation_samples' = 0"),
    ],
)
def test_bad_evaluation_settings_are_one_line(tiny_lm_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(tiny_lm_dir, **overrides)


def _digit_problems(path) -> str:
    """Problems with one-digit answers, scored on the response's last number: a random tiny model solves
    some of them, so held-out pass@1 differs between trials."""
    import json

    rows = [{"problem": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_tune_selects_on_held_out_pass_at_1(tiny_lm_dir, tmp_path, ray_session):
    """Two trials differing in temperature: Tune, with metric evaluation/pass@1, picks the one with the
    higher held-out pass@1."""
    from ray import tune

    import rllib_treerpo  # noqa: F401  registers "TreeRPO"

    env_config = {"dataset": _digit_problems(tmp_path / "digits.jsonl"), "answer_format": "last_number"}
    config = small_config(
        tiny_lm_dir,
        env="treerpo/MathProblems-v0",
        env_config=env_config,
        evaluation_config={"env_config": {}},
        **{**EVAL, "evaluation_duration": 20},
    ).to_dict()
    config["temperature"] = tune.grid_search([0.7, 3.0])
    analysis = tune.run(
        "TreeRPO",
        config=config,
        metric="evaluation/pass@1",
        mode="max",
        stop={"training_iteration": 1},
        storage_path=str(tmp_path),
        verbose=0,
    )
    scores = {t.config["temperature"]: t.last_result["evaluation"]["pass@1"] for t in analysis.trials}
    assert len(scores) == 2 and scores[0.7] != scores[3.0], scores
    assert analysis.best_config["temperature"] == max(scores, key=scores.get)
