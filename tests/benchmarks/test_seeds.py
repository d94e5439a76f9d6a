"""benchmarks.seeds: the runs' warm start build records reach the JSON line, and --rebuild-warmstart makes
the runs build their warm start into a fresh cache (the runs themselves: `treerpo train`, tests/jobs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import seeds
from rllib_treerpo.models import warmstart


def _fake_train(calls):
    """Stands in for the `treerpo train` subprocess (minutes each): records its environment, writes what a run
    leaves (summary.json, the model's build record)."""

    def run(command, cwd, check, env):
        out = command[command.index("--output") + 1]
        seed = int(command[command.index("--set") + 1].split("=")[1])
        calls.append((seed, env))
        evals = {
            f"eval_{when}": {
                "pass@1": 0.5 + g,
                "greedy_accuracy": 0.995 - g / 10,
                "mean_response_tokens": 31.6,
            }
            for when, g in (("before", 0.0), ("after", 0.25 + seed / 100))
        }
        evals["eval_after"] |= {"problems": 200, "samples": 16}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(evals))
        warmstart.copy_record(warmstart.SHIPPED, out)

    return run


def _main(monkeypatch, capsys, *argv):
    calls = []
    monkeypatch.setattr(seeds.subprocess, "run", _fake_train(calls))
    monkeypatch.setattr(sys, "argv", ["seeds", *argv])
    seeds.main()
    out = capsys.readouterr().out
    return calls, out, json.loads(out.strip().splitlines()[-1])


def test_the_json_line_records_the_warm_start_build(monkeypatch, capsys, tmp_path):
    calls, out, line = _main(monkeypatch, capsys, "--seeds", "0,1", "--out", str(tmp_path))
    assert [seed for seed, _ in calls] == [0, 1]
    assert all("TREERPO_BUILD_WARMSTART" not in env for _, env in calls)
    assert line["warmstart_builds"] == [warmstart.read_record(warmstart.SHIPPED)]
    assert line["rebuild_warmstart"] is False and [r["seed"] for r in line["rows"]] == [0, 1]
    assert "| 1 | 0.500 -> 0.760 | 0.995 -> 0.969 (-2.6 points) |" in out
    assert f"built {warmstart.read_record(warmstart.SHIPPED)['built_at']} on" in out


def test_rebuild_warmstart_builds_into_a_fresh_cache(monkeypatch, capsys, tmp_path):
    stale = tmp_path / "warmstart_cache" / "warmstart-000000000000"
    stale.mkdir(parents=True)
    calls, _, line = _main(monkeypatch, capsys, "--seeds", "3", "--out", str(tmp_path), "--rebuild-warmstart")
    ((_, env),) = calls
    assert env["TREERPO_BUILD_WARMSTART"] == "1" and env["TREERPO_CACHE"] == str(tmp_path / "warmstart_cache")
    assert not stale.exists() and line["rebuild_warmstart"] is True
