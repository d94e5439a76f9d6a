"""Smoke test of benchmarks/compare.py: every algorithm trains and is evaluated, outputs are written."""

import json

from benchmarks import compare


def test_compare_smoke(tiny_lm_dir, ray_session, tmp_path, capsys):
    out = tmp_path / "cmp"
    results = compare.main(
        [
            "--model",
            tiny_lm_dir,
            "--budget",
            "1200",
            "--seeds",
            "1",
            "--difficulties",
            "easy",
            "--evals",
            "1",
            "--eval-problems",
            "3",
            "--eval-samples",
            "2",
            "--output",
            str(out),
            "--set",
            "prompts_per_iteration=2",
            "--set",
            "TreeRPO:branching=[2, 2]",
            "--set",
            "PPO:train_batch_size=24",
            "--set",
            "PPO:minibatch_size=24",
            "--set",
            "PPO:ppo={num_envs_per_env_runner: 6}",
        ]
    )
    easy = results["easy"]
    assert set(easy) == {"before", "TreeRPO", "GRPO", "PPO"}
    for name in ("TreeRPO", "GRPO", "PPO"):
        r = easy[name]
        assert r["generated_tokens"] >= 1200 and r["prompts"] > 0
        assert 0.0 <= r["accuracy_mean"] <= 1.0 and r["accuracy_std"] == 0.0 and r["wall_seconds"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["easy"]["GRPO"]["generated_tokens"] == easy["GRPO"]["generated_tokens"]
    assert (out / "curves_easy.png").stat().st_size > 0 and "| GRPO |" in (out / "results.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["easy"]["PPO"]["pass@1"] == round(easy["PPO"]["accuracy_mean"], 4)
