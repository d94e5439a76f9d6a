"""docs/plug_in_env.md: its worked example runs exactly as written, and its YAML snippets are valid
configs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plug_in_env.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_worked_example_runs_as_written(tmp_path):
    """Blocks starting with `# file: NAME` are saved as NAME; the other python blocks run, in order, as one
    script in that folder (a fresh interpreter, as a user would run them)."""
    script = []
    for code in blocks("python"):
        first = code.splitlines()[0]
        if first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(code)
        else:
            script.append(code)
    assert (tmp_path / "my_envs.py").exists() and script
    (tmp_path / "example.py").write_text("\n".join(script))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    proc = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"Parity of [01]{4}\? Answer \\boxed\{even\} or \\boxed\{odd\}\.\n", proc.stdout)


def test_yaml_snippets_are_config_fields(tmp_path_factory):

    snippets = blocks("yaml")
    assert len(snippets) >= 4
    for text in snippets:
        values = yaml.safe_load(text)
        if "sweep" in values:  # the sweep section alone: test_sweep_snippet_is_a_valid_sweep
            continue
        from rllib_treerpo.jobs.config import load_run_config

        path = Path(tmp_path_factory.mktemp("snippet")) / "c.yaml"
        path.write_text(yaml.safe_dump(values))
        load_run_config(path)


def test_reasoning_gym_snippet_builds_its_env():
    pytest.importorskip("reasoning_gym")
    from envs import make_reasoning_env

    values = next(yaml.safe_load(t) for t in blocks("yaml") if "ReasoningGym" in t)
    env = make_reasoning_env(values["env"], {**values["env_config"], **values["eval_env_config"]})
    prompt, _ = env.reset(options={"problem_index": 0})
    assert "\\boxed{ANSWER}" in prompt and env.split == "test"


def test_sweep_snippet_is_a_valid_sweep(tmp_path):
    from rllib_treerpo.jobs.sweep_spec import load_sweep

    sweep = next(yaml.safe_load(t) for t in blocks("yaml") if "sweep" in yaml.safe_load(t))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep))
    _, _, spec = load_sweep(path)
    assert set(spec.space) == {"tau", "lr"} and spec.scheduler == "asha"
