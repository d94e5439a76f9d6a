"""benchmarks/learner_replica.py: variant resolution, a parallel sweep of two runs, and its table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import learner_replica as replica  # noqa: E402

sys.path.remove(str(BENCH))


def test_variants_resolve_to_the_difficulty_tree_shapes():
    assert replica.settings("easy", "base")["branching"] == [16]
    assert replica.settings("hard", "base")["step_tokens"] == 72  # one step = the whole response: GRPO
    tree = replica.settings("hard", "tree_mb4_lr3e-5")
    assert (tree["branching"], tree["step_tokens"], tree["delim"]) == ([2] * 6, 12, "\n")
    assert (tree["lr"], tree["minibatches"]) == (3e-5, 4)
    cut = replica.settings("easy", "tree_4x3_mb4_lr3e-5")
    assert (cut["branching"], cut["step_tokens"], cut["delim"]) == ([4, 4, 4], 16, None)
    with pytest.raises(KeyError):
        replica.settings("easy", "no_such_variant")


def test_sweep_runs_each_variant_and_tables_them(tiny_lm_dir, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(BENCH / "learner_replica.py")]
    subprocess.run(cmd + ["sweep", "--models", f"easy={tiny_lm_dir}", "--runs", "easy:base,easy:tree_4x3_mb4_lr3e-5",
                          "--seeds", "1", "--budget", "1", "--evals", "1", "--eval-start", "--problems", "2",
                          "--prompts", "2", "--parallel", "2", "--out", str(out)], check=True, timeout=300)
    base = [json.loads(x) for x in (out / "easy_base_0.jsonl").read_text().splitlines()]
    assert [r["tokens"] == 0 for r in base] == [True, False]  # --eval-start, then the one evaluation
    trained = base[-1]
    assert trained["iter"] == 1 and trained["prompts"] == 2 and trained["tokens"] > 0
    assert 0.0 <= trained["pass@1"] <= 1.0 and 0.0 <= trained["kept_groups"] <= 1.0
    tree = json.loads((out / "easy_tree_4x3_mb4_lr3e-5_0.jsonl").read_text().splitlines()[-1])
    assert tree["variant"] == "tree_4x3_mb4_lr3e-5" and tree["tokens"] > 0
    png = tmp_path / "curves.png"
    table = subprocess.run(cmd + ["table", *map(str, sorted(out.glob("*.jsonl"))), "--plot", str(png)], check=True,
                           capture_output=True, text=True, timeout=60).stdout
    assert "| easy | before RL |" in table and "| easy | tree_4x3_mb4_lr3e-5 |" in table
    assert png.stat().st_size > 10_000
