"""Fuzz: 200 seeded mutations of the shipped configs through the loader and the cheap part of starting a run.

Each mutation (a wrong type, an out-of-range number, an unknown key, a bad nested value, a number written as a
string) is written to a YAML file and goes through ``load_run_config`` (file -> TreeRPOConfig + JobConfig),
the env (``make_reasoning_env``, the training and the held-out one), the TreeSpec and the job's fields. Each
either loads or raises a one-line ValueError that names the mutated key (or its parent field, or the file). No
other exception.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CASES = 200
BAD_VALUES = [
    -1,
    0,
    -0.5,
    1e12,
    2.5,
    float("nan"),
    float("inf"),
    True,
    None,
    "",
    "abc",
    "1e-4",
    [],
    [1, "x"],
    {},
]
BAD_VALUES += [{"a": 1}, [[1]], "-3", "0.5", 10**30]


def problems_file(folder: Path) -> str:
    """Problems with both answer columns the shipped configs read (answer; solution with a \\boxed{})."""
    path = folder / "problems.jsonl"
    rows = [
        {"problem": p, "answer": a, "solution": f"\\boxed{{{a}}}"} for p, a in (("1+1?", "2"), ("2+3?", "5"))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def shipped(path: Path, dataset: str) -> dict:
    """A shipped config; the GPU configs' problem files (data/*.jsonl, not in the repository) -> a tiny
    one."""
    values = yaml.safe_load(path.read_text())
    for key in ("env_config", "eval_env_config"):
        if isinstance(values.get(key), dict) and "dataset" in values[key]:
            values[key]["dataset"] = dataset
    return values


def mutate(values: dict, rng: random.Random) -> tuple[dict, list[str]]:
    """One mutation; returns the mapping and the names an error about it may give (key, parent field)."""
    values = yaml.safe_load(yaml.safe_dump(values))  # a deep copy
    nested = [k for k, v in values.items() if isinstance(v, dict) and k != "sweep"]
    kind = rng.choice(["value", "value", "string", "unknown", "nested", "nested_unknown"])
    key = rng.choice(sorted(values))
    if kind == "string" and isinstance(values[key], int | float) and not isinstance(values[key], bool):
        values[key] = rng.choice([str(values[key]), f"{values[key]}x", f"{float(values[key]):e}"])
        return values, [key]
    if kind == "unknown":
        name = rng.choice([key + "s", key[:-1], key.upper(), "learning_rate", "num_workers", "foo"])
        values[name] = rng.choice(BAD_VALUES)
        return values, [name]
    if kind.startswith("nested") and nested:
        parent = rng.choice(nested)
        inner = values[parent]
        name = rng.choice(sorted(inner)) if inner and kind == "nested" else rng.choice(["bogus", "num_opps"])
        inner[name] = rng.choice(BAD_VALUES)
        return values, [parent, name]
    values[key] = rng.choice(BAD_VALUES)
    return values, [key]


def start_cheaply(path: Path) -> None:
    """What a run does before any model or Ray: load, build the envs, the TreeSpec, the job config."""
    from envs import make_reasoning_env
    from rllib_treerpo.jobs.config import load_run_config

    config, job, _ = load_run_config(path)
    make_reasoning_env(config.env, config.env_config)
    make_reasoning_env(config.env, {**config.env_config, **job.eval_env_config}, field="eval_env_config")
    config.tree_spec()


def test_every_shipped_config_starts_cheaply(tmp_path):
    dataset = problems_file(tmp_path)
    for path in CONFIGS:
        mutated = tmp_path / path.name
        mutated.write_text(yaml.safe_dump(shipped(path, dataset)))
        start_cheaply(mutated)


def test_mutated_configs_load_or_fail_in_one_line_naming_the_key(tmp_path):
    rng = random.Random(13)
    dataset = problems_file(tmp_path)
    bases = {path.name: shipped(path, dataset) for path in CONFIGS}
    bad, refused = [], 0
    for case in range(CASES):
        name = rng.choice(sorted(bases))
        values, names = mutate(bases[name], rng)
        path = tmp_path / f"case{case}_{name}"
        path.write_text(yaml.safe_dump(values))
        try:
            start_cheaply(path)
        except ValueError as e:
            refused += 1
            message = str(e)
            if "\n" in message or not any(repr(n) in message or str(path) in message for n in names):
                bad.append(f"{path.name} {names}: {message!r}")
        except Exception as e:  # noqa: BLE001 - the point: no other exception type
            bad.append(f"{path.name} {names}: {type(e).__name__}: {e}")
    assert not bad, "\n".join(bad)
    assert refused > CASES // 2  # most mutations are bad values, not harmless ones


@pytest.mark.parametrize("value", ["1e-4", "3e-5", "1.5e-6"])
def test_a_learning_rate_in_e_notation_is_a_number(tmp_path, value):
    """YAML 1.1 reads 1e-4 as a string; users write it: numeric fields take it as the number."""
    from rllib_treerpo.jobs.config import load_run_config

    path = tmp_path / "lr.yaml"
    path.write_text(f"lr: {value}\nkl_coef: {value}\n")
    config, _, _ = load_run_config(path)
    assert config.lr == float(value) and config.kl_coef == float(value)
