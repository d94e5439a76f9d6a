"""`dtype: auto` (precision.choose_dtype): bf16 where the learner's and the sampler's devices compute it
natively, float32 elsewhere; the choice and why on the run's first lines and in its config.yaml; explicit bf16
without native support runs with a warning. The hardware is mocked (Hardware, CPU flags); the run uses the
real job."""

from __future__ import annotations

import pytest
import yaml

from rllib_treerpo.learner import precision
from rllib_treerpo.learner.precision import Hardware, choose_dtype, cpu_has_native_bf16

AVX2 = Hardware("AVX2", False)
AVX512_BF16 = Hardware("AVX512", True)


@pytest.mark.parametrize(
    "hardware, placement, dtype, named",
    [
        (AVX2, {}, "float32", "CPU AVX2 without bf16"),
        (AVX512_BF16, {}, "bfloat16", "CPU AVX512 with bf16"),
        (
            Hardware("AVX2", False, "NVIDIA H100", True),
            {"learner_gpu": True, "sampler_gpu": True},
            "bfloat16",
            "H100",
        ),
        # a GPU learner with samplers on a CPU without bf16: the samplers decide
        (Hardware("AVX2", False, "NVIDIA H100", True), {"learner_gpu": True}, "float32", "for the sampler"),
        (
            Hardware("AVX512", True, "Tesla V100", False),
            {"learner_gpu": True},
            "float32",
            "without bf16 units",
        ),
        # a CPU driver of a GPU cluster: the workers' GPUs are not visible here
        (AVX2, {"learner_gpu": True, "sampler_gpu": True}, "bfloat16", "assumed sm_80+"),
        (AVX512_BF16, {"embedded_model": True}, "float32", "embedded tiny model"),
    ],
)
def test_auto_resolves_per_device(hardware, placement, dtype, named):
    choice = choose_dtype("auto", hardware, **placement)
    assert choice.dtype == dtype and choice.warning is None
    assert named in choice.reason and choice.lines()[0].startswith(f"dtype {dtype} (auto: ")


def test_explicit_dtypes_are_kept_and_bf16_without_native_support_warns():
    slow = choose_dtype("bfloat16", AVX2)
    assert slow.dtype == "bfloat16" and "16x" in slow.warning and "CPU AVX2" in slow.warning
    assert slow.lines()[1].startswith("WARNING: dtype bfloat16 where the learner and the sampler")
    assert choose_dtype("bfloat16", AVX512_BF16).warning is None
    assert choose_dtype("float32", AVX512_BF16).dtype == "float32"
    with pytest.raises(ValueError, match="'dtype' = 'float16'"):
        choose_dtype("float16", AVX2)


@pytest.mark.parametrize(
    "capability, flags, onednn, native",
    [
        ("AVX2", {"architecture": "x86_64", "avx2": True}, False, False),
        ("AVX512", {"architecture": "x86_64", "avx512_f": True}, True, False),  # AVX-512 without BF16
        ("AVX512", {"architecture": "x86_64", "avx512_bf16": True}, True, True),
        ("AVX512", {"architecture": "x86_64", "amx_bf16": True}, True, True),
        ("AVX2", {"architecture": "x86_64", "avx512_bf16": True}, True, False),  # ATEN_CPU_CAPABILITY=avx2
        ("AVX512", {"architecture": "x86_64", "avx512_bf16": True}, False, False),  # ONEDNN_MAX_CPU_ISA=AVX2
        ("SVE256", {"architecture": "aarch64", "sve_bf16": True}, None, True),
        ("DEFAULT", {"architecture": "aarch64", "neon": True}, None, False),
    ],
)
def test_cpu_bf16_is_the_instructions_torch_uses(capability, flags, onednn, native):
    assert cpu_has_native_bf16(capability, flags, onednn) is native


def test_the_run_prints_the_choice_and_records_it(tiny_lm_dir, tmp_path, ray_session, monkeypatch, capsys):
    """auto on a CPU with bf16: the run's first line says so, config.yaml and final_model's settings record
    bfloat16, so `treerpo eval` of final_model/ and `--resume` on a CPU without bf16 keep it (and warn)."""
    from rllib_treerpo.jobs.cli import main

    monkeypatch.setattr(precision, "detect_hardware", lambda cuda=False: AVX512_BF16)
    out = tmp_path / "run"
    sets = {
        "model_name_or_path": tiny_lm_dir,
        "iterations": 1,
        "branching": "[2]",
        "step_tokens": 4,
        "prompts_per_iteration": 2,
        "env_config": "{num_ops: 1}",
        "eval_problems": 0,
        "eval_every": 0,
        "save_trees": 0,
        "num_minibatches": 1,
    }
    args = ["train", "--output", str(out)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("dtype bfloat16 (auto: native bf16 for the learner and the sampler (CPU AVX512")
    assert yaml.safe_load((out / "config.yaml").read_text())["dtype"] == "bfloat16"
    assert yaml.safe_load((out / "final_model" / "treerpo_run.yaml").read_text())["dtype"] == "bfloat16"

    monkeypatch.setattr(precision, "detect_hardware", lambda cuda=False: AVX2)
    evaluation = ["--problems", "1", "--samples", "1", "--output", str(tmp_path / "eval")]
    assert main(["eval", "--model", str(out / "final_model"), *evaluation]) == 0
    printed = capsys.readouterr().out
    assert (
        "eval: dtype bfloat16 (--dtype or the training run's; CPU AVX2 without bf16 instructions)" in printed
    )
    assert (
        "eval: WARNING: dtype bfloat16 where the learner and the sampler cannot compute it natively"
        in printed
    )
    assert main(["train", "--resume", str(out), "--set", "iterations=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dtype bfloat16 (set in the config; CPU AVX2") and "16x" in lines[1]
    assert yaml.safe_load((out / "config.yaml").read_text())["dtype"] == "bfloat16"


def test_auto_on_a_cpu_without_bf16_is_float32_in_config_yaml(tiny_lm_dir):
    from rllib_treerpo.jobs.config import flat_config, load_run_config

    lines = []
    config, job, _ = load_run_config(None, {"model_name_or_path": tiny_lm_dir}, announce=lines.append)
    assert flat_config(config, job)["dtype"] == "float32"
    assert lines == [
        f"dtype float32 (auto: no native bf16 for the learner and the sampler (CPU "
        f"{precision.cpu_capability()} without bf16 instructions); bf16 there: {precision.SLOWDOWN})"
    ]
