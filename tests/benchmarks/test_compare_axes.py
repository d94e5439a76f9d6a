"""compare_lib's two axes: aggregation at equal training seconds, tokens per prompt, table and plot."""

import pytest

from benchmarks import compare
from benchmarks import compare_lib as lib


def run(seed: int, seconds: list[float], accuracy: list[float], tokens_per_prompt: float) -> dict:
    points = [
        {
            "tokens": 1000.0 * i,
            "prompts": 1000.0 * i / tokens_per_prompt,
            "seconds": s,
            "iteration": i,
            "pass@1": a,
            "greedy": 1.0 - a / 10,
            "response_tokens": 30.0,
        }
        for i, (s, a) in enumerate(zip(seconds, accuracy, strict=True))
    ]
    return {"seed": seed, "points": points, "train_seconds": seconds[-1]}


def test_aggregate_interpolates_at_equal_seconds_and_reports_tokens_per_prompt():
    runs = [run(0, [0, 10, 20], [0.2, 0.4, 0.6], 50.0), run(1, [0, 20, 40], [0.2, 0.4, 0.6], 50.0)]
    r = lib.aggregate(runs, equal_prompts=20.0, equal_seconds=10.0)
    # seed 0 is at 0.4 after 10 s, seed 1 halfway to its first point (0.3)
    assert r["accuracy_at_equal_seconds_mean"] == pytest.approx(0.35)
    assert r["accuracy_at_equal_seconds_std"] == pytest.approx(0.05)
    assert r["tokens_per_prompt"] == pytest.approx(50.0)
    assert r["wall_seconds"] == pytest.approx(30.0) and r["wall_seconds_std"] == pytest.approx(10.0)
    assert r["per_seed_train_seconds"] == [20, 40]
    # without equal_seconds: the fastest run's seconds
    assert lib.aggregate(runs, equal_prompts=20.0)["equal_seconds"] == 20


def test_table_and_plot_carry_both_axes(tmp_path):
    runs = {
        "A": [run(0, [0, 5, 10], [0.2, 0.3, 0.5], 40.0)],
        "B": [run(0, [0, 50, 100], [0.2, 0.5, 0.7], 30.0)],
    }
    results = {k: lib.aggregate(v, equal_prompts=50.0, equal_seconds=10.0) for k, v in runs.items()}
    before = {"pass@1": 0.2, "greedy": 0.98, "response_tokens": 30.0}
    table = lib.markdown_table("t", before, results)
    assert "| train s |" in table and "tokens / prompt" in table and "at equal train s" in table
    row_b = next(line for line in table.splitlines() if line.startswith("| B |"))
    assert "| 100 ± 0 | 30 |" in row_b and "0.260 ± 0.000 (@10 s)" in row_b
    path = tmp_path / "c.png"
    lib.plot_curves(runs, "t", path)
    assert path.stat().st_size > 10_000


def test_training_stats_explain_the_rows():
    tree = run(0, [0, 10], [0.2, 0.4], 50.0)
    tree["metrics"] = [
        {"tree/frac_groups_filtered": 0.2, "loss/optimizer_steps": 4, "perf/sample_seconds": 3.0},
        {"tree/frac_groups_filtered": 0.4, "loss/optimizer_steps": 4, "perf/sample_seconds": 5.0},
    ]
    ppo = run(0, [0, 10], [0.2, 0.4], 30.0)
    ppo["metrics"] = [{"loss/policy_loss": 0.1, "perf/sample_seconds": 7.0}]
    stats = {k: lib.aggregate([r], equal_prompts=1.0) for k, r in (("T", tree), ("P", ppo))}
    assert stats["T"]["frac_groups_filtered"] == pytest.approx(0.3)
    assert stats["T"]["sample_seconds"] == pytest.approx(8.0) and stats["T"]["learn_seconds"] == 0.0
    assert "frac_groups_filtered" not in stats["P"]
    table = compare.markdown_why(stats)
    assert "| T | 0.30 | n/a | 4.0 |" in table and "| P | n/a | n/a | n/a |" in table
