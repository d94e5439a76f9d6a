"""`treerpo sweep`: validation before Ray starts, a 2-trial Tune sweep, its result files, and --resume."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from rllib_treerpo.jobs.cli import main
from rllib_treerpo.jobs.sweep import run_sweep
from rllib_treerpo.jobs.sweep_spec import load_sweep, search_space
from rllib_treerpo.rllib.algorithm import TreeRPOConfig

SMALL = {
    "branching": [2, 2],
    "step_tokens": 6,
    "prompts_per_iteration": 2,
    "lr": 1e-3,
    "env_config": {"num_ops": 1},
    "seed": 0,
}


def write(tmp_path, sweep, **fields):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **fields, "sweep": sweep}))
    return path


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start Ray or Tune."""
    import ray
    from ray import tune

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray/Tune was started before the config was validated")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(tune, "Tuner", forbidden)


def test_sweep_over_unknown_field_is_one_line_before_ray(tmp_path, no_ray, capsys):
    path = write(tmp_path, {"space": {"taus": {"grid_search": [0.0, 0.1]}}})
    assert main(["sweep", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown config field 'taus'" in err and "'tau'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "sweep, match",
    [
        ({"space": {"iterations": {"grid_search": [1, 2]}}}, "'iterations' is a job field"),
        ({"space": {"algorithm": {"choice": ["TreeRPO", "PPO"]}}}, "'algorithm' is a job field"),
        ({"space": {"tau": [0.0, 0.1]}}, r"sweep.space.tau must be a mapping with exactly one of"),
        ({"space": {"tau": {"gridsearch": [0.0]}}}, "exactly one of"),
        (
            {"space": {"tau": {"grid_search": [0.0, -1.0]}}},
            r"sweep.space.tau: value -1.0 must be a number >= 0",
        ),
        ({"space": {"lr": {"loguniform": [0.0, 1e-3]}}}, "low > 0"),
        ({"space": {"tau": {"uniform": [0.5, 0.1]}}}, "low < high"),
        ({"space": {"seed.x": {"choice": [1]}}}, "not a mapping field"),
        ({"space": {}}, "non-empty mapping"),
        ({"space": {"tau": {"choice": [0.1]}}, "metrc": "x"}, "unknown sweep key 'metrc'.*'metric'"),
        ({"space": {"tau": {"choice": [0.1]}}, "mode": "best"}, "sweep.mode must be max or min"),
        ({"space": {"tau": {"choice": [0.1]}}, "scheduler": "pbt"}, "sweep.scheduler"),
        (
            {"space": {"tau": {"choice": [0.1]}}, "iterations": 20, "scheduler": "asha", "grace_period": 2},
            "sweep.grace_period 2 < eval_every 10",
        ),
        (
            {"space": {"tau": {"choice": [0.1]}}, "iterations": 12},
            "sweep.iterations 12 is not a multiple of eval_every 10: .* iteration 10",
        ),
    ],
)
def test_bad_sweep_sections_are_named(tmp_path, no_ray, sweep, match):
    with pytest.raises(ValueError, match=match):
        run_sweep(write(tmp_path, sweep), tmp_path / "out")


def test_held_out_metric_needs_evaluation(tmp_path, no_ray):
    path = write(tmp_path, {"space": {"tau": {"choice": [0.1]}}, "metric": "evaluation/pass@1"}, eval_every=0)
    with pytest.raises(ValueError, match="held-out metric, but eval_every is 0"):
        run_sweep(path, tmp_path / "out")
    path = write(tmp_path, {"space": {"tau": {"choice": [0.1]}}}, evaluation_interval=3)
    with pytest.raises(ValueError, match="'evaluation_interval' = 3: .*job field 'eval_every'"):
        run_sweep(path, tmp_path / "out")


def test_config_without_sweep_section(tmp_path, no_ray):
    path = tmp_path / "plain.yaml"
    path.write_text("tau: 0.1\n")
    with pytest.raises(ValueError, match="no `sweep:` section"):
        load_sweep(path)


def test_search_space_merges_domains_into_the_config(tmp_path):
    config, job, spec = load_sweep(
        write(
            tmp_path,
            {
                "space": {
                    "tau": {"grid_search": [0.0, 0.1]},
                    "env_config.num_ops": {"choice": [1, 2]},
                    "lr": {"loguniform": [1e-5, 1e-3]},
                }
            },
        )
    )
    space = search_space(config, spec)
    assert space["tau"] == {"grid_search": [0.0, 0.1]}
    assert space["env_config"]["num_ops"].categories == [1, 2]
    assert space["lr"].lower == 1e-5 and space["branching"] == [2, 2]
    # the default metric is held-out pass@1 (the trials evaluate every eval_every iterations)
    assert spec.metric == "evaluation/pass@1" and spec.mode == "max" and spec.iterations == job.iterations
    assert space["evaluation_interval"] == job.eval_every


def test_two_trial_sweep_writes_results_and_resumes(tiny_lm_dir, tmp_path, ray_session):
    path = write(
        tmp_path,
        {
            "space": {"tau": {"grid_search": [0.0, 0.1]}, "lr": {"loguniform": [1e-4, 1e-3]}},
            "metric": "evaluation/pass@1",
            "mode": "max",
            "iterations": 1,
        },
        model_name_or_path=tiny_lm_dir,
        eval_every=1,
        eval_every_problems=4,
        eval_samples=2,
    )
    out = tmp_path / "out"
    summary = run_sweep(path, out, verbose=0)
    assert summary["trials"] == summary["expected_trials"] == summary["finished_trials"] == 2
    assert summary["errored_trials"] == 0 and summary["interrupted"] is False
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["tau"]) for r in rows) == [0.0, 0.1]
    assert all(
        1e-4 <= float(r["lr"]) <= 1e-3 and r["iterations"] == "1" and r["status"] == "done" for r in rows
    )
    assert all(0.0 <= float(r["reward/mean (last)"]) <= 1.0 for r in rows)
    # the held-out columns: the trials' evaluation of their last iteration, which the metric selects on
    assert all(r["held-out iteration"] == "1.0" and 0 <= float(r["held-out greedy"]) <= 1 for r in rows)
    assert all(r["held-out pass@1"] == r["evaluation/pass@1 (last)"] for r in rows)
    assert summary["best_metric"] == max(float(r["held-out pass@1"]) for r in rows)
    best = TreeRPOConfig.from_yaml(out / "best_config.yaml")  # a config `treerpo train` accepts
    assert best.tau in (0.0, 0.1) and best.tau == summary["best_params"]["tau"]
    assert best.branching == [2, 2] and best.model_name_or_path == tiny_lm_dir
    assert json.loads((out / "summary.json").read_text())["best_metric"] == summary["best_metric"]
    from rllib_treerpo.models.model_io import resolve_model

    assert resolve_model(summary["best_checkpoint"]).kind == "checkpoint"  # `treerpo eval` takes it

    with pytest.raises(ValueError, match="already holds a sweep.*--resume"):
        run_sweep(path, out, verbose=0)
    again = run_sweep(path, out, resume=True, verbose=0)  # finished trials stay finished
    assert again["trials"] == 2 and again["best_params"] == summary["best_params"]
    with pytest.raises(ValueError, match="no sweep to resume"):
        run_sweep(path, tmp_path / "elsewhere", resume=True, verbose=0)
