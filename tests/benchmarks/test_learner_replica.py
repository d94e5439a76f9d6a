"""benchmarks/learner_replica.py: a parallel sweep of two runs through the Ray-free iteration core, and its
table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_runs_each_algorithm_and_tables_them(tiny_lm_dir, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "benchmarks.learner_replica"]
    subprocess.run(
        cmd
        + [
            "sweep",
            "--model",
            tiny_lm_dir,
            "--runs",
            "easy:TreeRPO,easy:GRPO",
            "--seeds",
            "1",
            "--iters",
            "1",
            "--evals",
            "1",
            "--eval-start",
            "--problems",
            "2",
            "--samples",
            "2",
            "--set",
            "prompts_per_iteration=2",
            "--set",
            "TreeRPO:branching=[2, 2]",
            "--parallel",
            "2",
            "--out",
            str(out),
        ],
        check=True,
        timeout=300,
        cwd=ROOT,
    )
    tree = [json.loads(x) for x in (out / "easy_TreeRPO_0.jsonl").read_text().splitlines()]
    assert [r["tokens"] == 0 for r in tree] == [True, False]  # --eval-start, then the one evaluation
    trained = tree[-1]
    assert trained["iter"] == 1 and trained["prompts"] == 2 and trained["tokens"] > 0
    assert 0.0 <= trained["pass@1"] <= 1.0 and 0.0 <= trained["kept_groups"] <= 1.0
    grpo = json.loads((out / "easy_GRPO_0.jsonl").read_text().splitlines()[-1])
    assert grpo["label"] == "GRPO" and grpo["tokens"] > trained["tokens"]  # 16 x 48 tokens vs a [2, 2] tree
    png = tmp_path / "curves.png"
    table = subprocess.run(
        cmd + ["table", *map(str, sorted(out.glob("*.jsonl"))), "--plot", str(png)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    ).stdout
    assert "| easy | before RL |" in table and "| easy | TreeRPO |" in table and "| easy | GRPO |" in table
    assert png.stat().st_size > 10_000
