"""The `treerpo train` job as a user meets it: output folder, resume from the last checkpoint, misfits and
config errors in one line before any expensive work, run folders that are never silently overwritten, Ctrl-C,
numbers as users write them, the metrics rows and the progress line, `treerpo show`."""

from __future__ import annotations

import json
import time

import numpy as np
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


FAST = [
    "--set",
    "iterations=2",
    "--set",
    "prompts_per_iteration=2",
    "--set",
    "branching=[2, 2]",
    "--set",
    "eval_problems=2",
    "--set",
    "eval_samples=1",
    "--set",
    "eval_every=1",
    "--set",
    "eval_every_problems=2",
    "--set",
    "checkpoint_every=1",
]


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
    [
        (["--set", "branchings=[2]"], "unknown config field 'branchings'"),
        (["--set", "tau=-1"], "'tau'"),
        (["missing.yaml"], "missing.yaml: cannot read"),
        (["bad.yaml"], "not valid YAML at line"),
        (["--set", "branching=[4, 4"], "--set 'branching=[4, 4': not valid YAML"),
    ],
)
def test_config_file_and_value_errors_are_one_line(args, message, capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("branching: [4, 4\ntau: 0.1\n")
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    assert main(["train", "--output", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "\n" not in err.strip(), err


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


def test_train_without_a_config_runs_and_show_draws_its_trees(
    embedded_default, ray_session, tmp_path, capsys
):
    from rllib_treerpo.core.advantages import tree_advantages
    from rllib_treerpo.jobs.trees import load, scored, show

    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *FAST]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and all("eval/pass@1" in r for r in rows)
    assert "held-out pass@1" in capsys.readouterr().out  # the progress line shows the latest held-out numbers
    record = json.loads((out / "warmstart_build.json").read_text())  # how the run's warm start was built
    assert record == json.loads(open(f"{embedded_default}/build.json").read())

    assert main(["show", str(out), "--iteration", "2", "--tree", "1"]) == 0
    page = out / "show" / "iter_000002_tree1.html"
    assert page.exists() and page.with_suffix(".png").stat().st_size > 5000
    saved = load(out, 2)
    record = saved["trees"][1]
    parent = np.array([n["parent"] for n in record["nodes"]])
    reward = np.array([np.nan if n["reward"] is None else n["reward"] for n in record["nodes"]])
    values, advantages = tree_advantages(parent, reward, tau=0.1)  # the run's settings: the defaults
    got_values, got_advantages = scored(record, saved["settings"])
    np.testing.assert_array_equal(values, got_values)
    np.testing.assert_array_equal(advantages, got_advantages)
    html = page.read_text()
    assert "<script" not in html and "http" not in html  # self-contained
    for i in range(1, len(values)):
        assert f"value {values[i]:.2f}" in html
        if np.isfinite(advantages[i]):
            assert f"advantage {advantages[i]:+.2f}" in html
    with pytest.raises(ValueError, match="--iteration 7"):
        show(out, iteration=7)


@pytest.mark.parametrize(
    "args, field",
    [
        (
            ["--set", "step_tokens=200"],
            "'step_tokens' = 200",
        ),  # 3 x 200 + the prompt > the tiny model's 512 tokens
        (["--set", "branching=[2, 2, 2, 2, 2, 2]"], "'branching'"),  # deeper than the env's 5 steps
        (["--set", "env=treerpo/Arithmetc-v0"], "'env'"),
        (["--set", "env_config={num_ops: 0}"], "num_ops"),
        (["--set", "lr=fast"], "'lr'"),
    ],
)
def test_a_misfit_fails_in_one_line_before_anything_expensive(args, field, tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the checks"))
    start = time.perf_counter()
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - start < 5 and "\n" not in err and field in err, err
    assert not out.exists()  # nothing was written (no warm start, no folder)


def test_numbers_parse_as_users_write_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-5\nwarmstart: {lr: 2e-3}\n")
    config, job, _ = load_run_config(path, {"kl_coef": "1e-2"})
    assert config.lr == 3e-5 and job.warmstart["lr"] == 2e-3 and config.kl_coef == 0.01
    from rllib_treerpo.jobs.cli import parse_key_values

    assert parse_key_values(["lr=1e-4", "tau=0", "branching=[4, 4]", "name=1e4x"], "--set") == {
        "lr": 1e-4,
        "tau": 0,
        "branching": [4, 4],
        "name": "1e4x",
    }


def test_a_run_folder_is_never_silently_overwritten(tiny_lm_dir, ray_session, tmp_path, capsys, monkeypatch):
    """A second run into a folder that holds one is refused; --overwrite starts over; Ctrl-C ends in one line
    naming where to resume; a run that never checkpointed cannot be resumed."""
    from rllib_treerpo.rllib.algorithm import TreeRPO

    out = tmp_path / "run"
    args = ["train", "--output", str(out), "--set", f"model_name_or_path={tiny_lm_dir}", *FAST]
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(args) == 2
    assert "already holds a run (2 iterations recorded)" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost

    calls = {"n": 0}
    real = TreeRPO.train

    def interrupted_train(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(TreeRPO, "train", interrupted_train)
    assert main([*args, "--overwrite"]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "interrupted at iteration 1" in err and f"--resume {out}" in err, err
    monkeypatch.setattr(TreeRPO, "train", real)
    assert main(["train", "--resume", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]

    never = tmp_path / "never"
    never.mkdir()
    (never / "config.yaml").write_text("tau: 0.1\n")  # a run that failed before its first checkpoint
    assert main(["train", "--resume", str(never)]) == 2
    assert "never saved a checkpoint" in capsys.readouterr().err


def test_run_folder_pruning_by_number_and_nan_free_metrics(tmp_path):
    from rllib_treerpo.jobs.run_folder import RunFolder

    class FakeAlgo:
        def save_to_path(self, path):
            from pathlib import Path

            Path(path).mkdir(parents=True)
            (Path(path) / "rllib_checkpoint.json").write_text("{}")

    folder = RunFolder(tmp_path / "run")
    for it in (9, 12, 1, 2, 3, 4):  # the old run's 9 and 12 are a discarded future once 1-4 are written
        folder.save_checkpoint(FakeAlgo(), it)
    assert sorted(p.name for p in folder.checkpoints.glob("iter_*")) == ["iter_000003", "iter_000004"]
    assert folder.latest_checkpoint().name == "iter_000004"
    for it in (
        8,
        10,
        100,
    ):  # by number: 100 > 10 > 8 (by name "iter_000100" would also sort last, 8 vs 10 not)
        folder.save_checkpoint(FakeAlgo(), it)
    assert sorted(p.name for p in folder.checkpoints.glob("iter_*")) == ["iter_000010", "iter_000100"]
    folder.append({"iteration": 1, "loss/total": float("nan"), "eval/pass@1": float("inf")})
    (row,) = [json.loads(line) for line in folder.metrics.read_text().splitlines()]  # strict JSON: no NaN
    assert row == {"iteration": 1, "loss/total": None, "eval/pass@1": None}


def test_the_progress_line_warns_when_nothing_is_learned():
    """All groups filtered, every reward equal (tau 0 keeps such groups, their advantages are 0) and a lost
    env runner: each is said on the progress line; a normal iteration has no warning."""
    from rllib_treerpo.jobs.train import treerpo_parts

    config, job, _ = load_run_config(None)
    progress = treerpo_parts(config, job).progress
    normal = {"reward/mean": 0.4, "reward/std": 0.49, "loss/optimizer_steps": 4, "tree/train_tokens": 900}
    assert "WARNING" not in progress(normal) and "env runner" not in progress(normal)
    filtered = {**normal, "loss/optimizer_steps": 0, "tree/train_tokens": 0}
    assert "WARNING: no training step (every sibling group was filtered" in progress(filtered)
    flat = {**normal, "reward/mean": 0.0, "reward/std": 0.0}
    assert "WARNING: every leaf reward was 0.00: no learning signal" in progress(flat)
    lost = {
        **normal,
        "perf/env_runner_failures": 1,
        "perf/env_runner_restarts": 1,
        "perf/resampled_trees": 16,
    }
    assert "env runner lost 1, restarted 1, trees re-grown 16" in progress(lost)
