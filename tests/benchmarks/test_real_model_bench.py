"""benchmarks/real_model.py runs end to end on a tiny model with a real BPE tokenizer and chat template."""

from __future__ import annotations

import pytest

pytest.importorskip("reasoning_gym")

from benchmarks import real_model  # noqa: E402
from rllib_treerpo.models.tiny import build_bpe_tokenizer, build_tiny_model  # noqa: E402


def test_real_model_benchmark_smoke(tmp_path, capsys):
    tokenizer = build_bpe_tokenizer()
    build_tiny_model(
        len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = ["--model", str(tmp_path), "--problems", "2", "--samples", "2", "--max-new-tokens", "8"]
    result = real_model.main(args + ["--prompts", "1", "--step-tokens", "2"])
    assert result["sampling"]["tree"]["leaves"] == result["sampling"]["flat"]["leaves"] == 8
    assert result["sampling"]["tree"]["decode_tokens"] == 2 * (2 + 4 + 8)  # EOS off: every step full length
    assert result["sampling"]["flat"]["decode_tokens"] == 8 * 6
    for name in ("eval_chat_template", "eval_plain_prompt"):
        assert all(
            0.0 <= result[name][k] <= 1.0
            for k in ("pass@1", "pass@1_explicit", "pass@1_last_number", "greedy")
        )
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"model"')
