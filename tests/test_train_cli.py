"""The `treerpo train` job: output folder, resume from the last checkpoint, one-line config errors."""

import json

import pytest

from rllib_treerpo.jobs.cli import main
from rllib_treerpo.jobs.config import load_run_config
from rllib_treerpo.jobs.train import metrics_row, train

JOB = {
    "branching": [2, 2],
    "step_tokens": 6,
    "prompts_per_iteration": 2,
    "tau": 0.0,
    "lr": 1e-3,
    "seed": 0,
    "env_config": {"num_ops": 1},
    "eval_problems": 3,
    "eval_samples": 2,
    "checkpoint_every": 1,
}


def test_train_writes_outputs_and_resumes(tiny_lm_dir, tmp_path, ray_session, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output folder, as `make train` passes it
    out = tmp_path / "run"
    config, job, _ = load_run_config(
        None,
        {
            **JOB,
            "model_name_or_path": tiny_lm_dir,
            "iterations": 2,
            "eval_every": 1,
            "eval_every_problems": 2,
        },
    )
    summary = train(config, job, "run")
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "learning_curve.png",
        "eval_before.json",
        "eval_after.jsonl",
        "summary.json",
        "final_model/config.json",
        "final_model/treerpo_run.yaml",
        "checkpoints/latest",
        "trees/iter_000002.json",
    ):
        assert (out / name).exists(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard: `tensorboard --logdir runs`
    assert 0.0 <= summary["eval_after"]["pass@1"] <= 1.0
    assert len((out / "eval_after.jsonl").read_text().splitlines()) == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # 0: the held-out curve's start, before training
    assert set(rows[0]) == {"iteration", "eval/pass@1", "eval/greedy_accuracy", "eval/mean_response_tokens"}
    assert {
        "reward/mean",
        "tree/frac_groups_filtered",
        "loss/policy_loss",
        "perf/decode_tokens_per_s",
        "eval/pass@1",
    } <= set(rows[1])
    assert all(
        r["loss/optimizer_steps"] == min(4, r["tree/train_packs"]) for r in rows[1:]
    )  # num_minibatches 4

    # Simulate an interruption after iteration 2's checkpoint but with a row of a lost iteration 3 written.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "reward/mean": -1}) + "\n")
    assert main(["train", "--resume", str(out), "--set", "iterations=4"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3]["reward/mean"] >= 0  # the lost iteration's row was replaced, not kept
    assert (out / "checkpoints" / "latest").read_text() == "iter_000004"
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*")) == ["iter_000003", "iter_000004"]


@pytest.mark.parametrize(
    "args, message",
    [(["--set", "branchings=[2]"], "unknown config field 'branchings'"), (["--set", "tau=-1"], "'tau'")],
)
def test_config_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(["train", "--output", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_metrics_row_keeps_numpy_scalars():
    import numpy as np

    result = {
        "training_iteration": 3,
        "tree": {"trees": np.int64(2)},
        "learners": {
            "default_policy": {
                "loss/optimizer_steps": np.int64(4),
                "loss/total": np.float32(0.5),
                "flag": True,
            }
        },
    }
    row = metrics_row(result)
    assert row == {"iteration": 3, "tree/trees": 2.0, "loss/optimizer_steps": 4.0, "loss/total": 0.5}


def test_an_iteration_without_an_update_has_no_stale_losses():
    result = {
        "training_iteration": 5,
        "loss": {"optimizer_steps": 0.0},
        "tree": {"train_tokens": 0.0},
        "learners": {"default_policy": {"loss/total": 0.3, "loss/kl": float("nan")}},
    }
    assert metrics_row(result) == {"iteration": 5, "loss/optimizer_steps": 0.0, "tree/train_tokens": 0.0}
