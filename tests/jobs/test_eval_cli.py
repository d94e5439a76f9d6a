"""`treerpo eval`: a plain model folder, an RLlib checkpoint, a `treerpo train` output folder, bad paths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from rllib_treerpo.jobs.cli import main
from rllib_treerpo.jobs.eval import eval_model
from rllib_treerpo.models.model_io import load_policy, resolve_model
from rllib_treerpo.rllib.algorithm import TreeRPOConfig

SMALL = {
    "branching": [2, 2],
    "step_tokens": 6,
    "prompts_per_iteration": 2,
    "tau": 0.0,
    "lr": 1e-2,
    "env_config": {"num_ops": 1},
    "eval_env_config": {"split": "test"},
    "seed": 0,
}


def read_rows(folder):
    return [json.loads(line) for line in (folder / "problems.jsonl").read_text().splitlines()]


def check_summary(summary, problems, samples, greedy=True):
    assert summary["problems"] == problems and summary["samples"] == samples
    for key in ("pass@1", f"pass@{samples}", "mean_reward") + (("greedy_accuracy",) if greedy else ()):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["mean_response_tokens"] > 0


@pytest.fixture(scope="module")
def checkpoint(tiny_lm_dir, tmp_path_factory, ray_session):
    """A TreeRPO checkpoint after one iteration, its learner weights then shifted so they surely differ from
    the base model's (a random tiny model rarely earns a reward, so one iteration may not move it)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    config = TreeRPOConfig.from_yaml(None, {**SMALL, "model_name_or_path": tiny_lm_dir})
    algo = config.build_algo()
    try:
        algo.train()
        weights = algo.learner_group.get_state()["learner"]["rl_module"][DEFAULT_MODULE_ID]
        shifted = {k: torch.as_tensor(v) + 0.01 for k, v in weights.items()}
        algo.learner_group.set_state({"learner": {"rl_module": {DEFAULT_MODULE_ID: shifted}}})
        path = tmp_path_factory.mktemp("ckpt") / "iter_000001"
        algo.save_to_path(str(path))
    finally:
        algo.stop()
    return path, {k.removeprefix("model."): v for k, v in shifted.items()}


def test_eval_hf_folder_writes_summary_and_rows(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--model",
            tiny_lm_dir,
            "--env",
            "treerpo/Arithmetic-v0",
            "--env-config",
            "num_ops=1",
            "split=test",
            "--samples",
            "2",
            "--problems",
            "3",
            "--max-new-tokens",
            "8",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    assert "pass@1" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    check_summary(summary, 3, 2)
    assert summary["settings"]["env_config"] == {"num_ops": 1, "split": "test"}
    rows = read_rows(out)
    assert [r["problem_index"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["prompt"].endswith("=?\n") and len(row["responses"]) == len(row["rewards"]) == 2
        assert all(r in (0.0, 1.0) for r in row["rewards"]) and "greedy_reward" in row


def test_eval_reasoning_gym_with_chat_template(tiny_lm_dir, tmp_path):
    pytest.importorskip("reasoning_gym")
    from transformers import AutoTokenizer

    model = tmp_path / "chat_model"
    shutil.copytree(tiny_lm_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    )
    tok.save_pretrained(model)
    summary = eval_model(
        str(model),
        env="treerpo/ReasoningGym-v0",
        env_config={"task": "chain_sum", "split": "test", "test_size": 2},
        samples=3,
        greedy=False,
        problems=5,
        max_new_tokens=4,
        chat_template=True,
        output=tmp_path / "o",
        progress=False,
    )
    check_summary(summary, 2, 3, greedy=False)  # capped at the env's 2 test problems
    rows = read_rows(tmp_path / "o")
    assert rows[0]["model_prompt"].startswith("<|user|>State the final answer")
    assert rows[0]["model_prompt"].endswith("<|assistant|>") and "greedy_reward" not in rows[0]


def test_eval_checkpoint_uses_learner_weights_and_training_env(checkpoint, tiny_lm_dir, tmp_path):
    path, weights = checkpoint
    resolved = resolve_model(str(path))
    assert resolved.kind == "checkpoint" and resolved.train_config["env"] == "treerpo/Arithmetic-v0"
    model, _, base = load_policy(resolved)
    assert base == tiny_lm_dir
    state = model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    base_model, _, _ = load_policy(resolve_model(tiny_lm_dir))
    assert not all(torch.equal(base_model.state_dict()[k], weights[k]) for k in weights)  # training moved it

    summary = eval_model(str(path), samples=2, problems=3, output=tmp_path / "e", progress=False)
    check_summary(summary, 3, 2)
    settings = summary["settings"]
    assert settings["env"] == "treerpo/Arithmetic-v0"
    assert settings["env_config"] == {"num_ops": 1, "split": "test"}  # env_config + eval_env_config
    assert settings["max_new_tokens"] == 12  # step_tokens 6 x depth 2
    assert len(read_rows(tmp_path / "e")) == 3


def test_eval_train_output_folder(checkpoint, tmp_path):
    """A `treerpo train` output folder without final_model/ (interrupted): its latest checkpoint."""
    path, weights = checkpoint
    run = tmp_path / "run"
    shutil.copytree(path, run / "checkpoints" / "iter_000001")
    (run / "checkpoints" / "latest").write_text("iter_000001")
    config = yaml.safe_load(yaml.safe_dump(resolve_model(str(path)).train_config["env_config"]))
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "env": "treerpo/Arithmetic-v0",
                "env_config": config,
                "eval_env_config": {"split": "test"},
                "step_tokens": 5,
                "branching": [2],
                "model_name_or_path": resolve_model(str(path)).train_config["model_name_or_path"],
            }
        )
    )
    resolved = resolve_model(str(run))
    assert resolved.kind == "checkpoint" and resolved.path == str(run / "checkpoints" / "iter_000001")
    assert resolved.train_config["step_tokens"] == 5  # the run's config.yaml
    model, _, _ = load_policy(resolved)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)

    shutil.copytree(resolved.train_config["model_name_or_path"], run / "final_model")  # a finished run
    finished = resolve_model(str(run))
    assert finished.kind == "hf" and finished.path == str(run / "final_model")
    assert finished.train_config["step_tokens"] == 5


def test_bad_model_paths_are_one_line_errors(tmp_path, tiny_lm_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    fake = tmp_path / "fake_ckpt"
    fake.mkdir()
    (fake / "rllib_checkpoint.json").write_text("{}")
    cases = [
        (tmp_path / "missing", "no such file or folder"),
        (tmp_path / "empty", "not a model"),
        (tmp_path / "file.txt", "is a file"),
        (fake, "not a TreeRPO checkpoint"),
    ]
    for path, message in cases:
        rc = main(["eval", "--model", str(path), "--env", "treerpo/Arithmetic-v0", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and str(path) in err and "\n" not in err, err


def test_unknown_env_and_missing_env_are_named(tiny_lm_dir, capsys):
    assert main(["eval", "--model", tiny_lm_dir, "--env", "treerpo/Arithmetc-v0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "treerpo/Arithmetc-v0" in err and "Arithmetic-v0" in err
    assert main(["eval", "--model", tiny_lm_dir, "--quiet"]) == 2
    assert "--env is required" in capsys.readouterr().err
    assert (
        main(["eval", "--model", tiny_lm_dir, "--env", "treerpo/Arithmetic-v0", "--env-config", "num_ops"])
        == 2
    )
    assert "expected key=value" in capsys.readouterr().err


def test_bad_dataset_is_named_before_the_model_loads(tiny_lm_dir, tmp_path, capsys):
    """MathProblemsEnv's own row checks (missing column, missing gold answer) surface as one-line errors."""
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    rc = main(
        [
            "eval",
            "--model",
            tiny_lm_dir,
            "--env",
            "treerpo/MathProblems-v0",
            "--env-config",
            f"dataset={data}",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (datasets prints a progress line before)
    assert (
        rc == 2
        and err.startswith(
            "treerpo: error: config field 'env_config': treerpo/MathProblems-v0: column 'problem' not found"
        )
        and "question" in err
    )
    data.write_text(json.dumps({"problem": "1+1?", "answer": ""}) + "\n")
    rc = main(
        [
            "eval",
            "--model",
            tiny_lm_dir,
            "--env",
            "treerpo/MathProblems-v0",
            "--env-config",
            f"dataset={data}",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        rc == 2
        and err.startswith("treerpo: error: config field 'env_config': treerpo/MathProblems-v0: bad row 0")
        and "'answer' is missing or empty" in err
    )
