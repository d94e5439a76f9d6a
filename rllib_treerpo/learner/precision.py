"""The learner's numeric precision: master weights, the compute dtype, the sampler's dtype. Ray-free.

Mixed precision, the way trainers do it (torch AMP): with ``dtype: bfloat16`` and ``mixed_precision: true``
the learner's model keeps float32 parameters (the master copy AdamW steps, so its state is float32 too: a
small-lr update is not rounded away) and its forward runs under ``torch.autocast(bfloat16)`` (matmuls in bf16,
reductions and the residual stream in fp32). :func:`compute_context` decides from the parameters' dtype, so
the RLlib module, its reference model and the Ray-free update (update.policy_update) all compute the same way.
``mixed_precision: false`` trains the bf16 weights themselves (bf16 AdamW state; most small updates round to
0). The sampler's copy is in ``dtype``: :func:`cast_floating` turns the master state into it for the weight
sync; the exported final_model is written in ``dtype`` too.

Which dtype (:func:`choose_dtype`): ``dtype: auto`` is bfloat16 where the learner's and the samplers' devices
compute it natively and float32 elsewhere; resolved once on the driver (:func:`resolve_config_dtype`), printed
with its reason and recorded in the run's config.yaml; :func:`hardware_keys` names the machine in the
benchmarks' JSON lines.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rllib_treerpo.models.model_io import DTYPES


def master_dtype(dtype: str, mixed_precision: bool) -> str:
    """The dtype the learner's parameters (and so its optimizer state) are kept in."""
    if dtype not in DTYPES:
        raise ValueError(f"config field 'dtype' = {dtype!r}: must be one of {list(DTYPES)}")
    return "float32" if mixed_precision else dtype


def compute_context(model: torch.nn.Module, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` when the model's floating parameters are wider (mixed precision), else
    a no-op: float32 runs and models already in ``dtype`` compute as they are."""
    target = DTYPES[dtype]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.dtype == target or target == torch.float32:
        return contextlib.nullcontext()
    # No cast cache: it would hold a low-precision copy of every weight until the forward ends, which gradient
    # checkpointing cannot free; without it each op casts its weight when it runs (the same numbers; the ops
    # that keep their input for the backward keep the cast anyway).
    return torch.autocast(device_type=param.device.type, dtype=target, cache_enabled=False)


def cast_floating(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors of ``state`` in ``dtype`` (e.g. the bf16 sampler's copy of float32 masters)."""
    target = DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


# The values of the config field dtype: auto is resolved by choose_dtype.
DTYPE_CHOICES = ("auto", *DTYPES)


# --- which dtype: `dtype: auto` -----------------------------------------------------------------------------
# bf16 where torch's kernels are AVX2: docs/real_models.md s.8 (SmolLM2-135M on 2 cores).
SLOWDOWN = "the learner about 12-16x and sampling 1.3-2x slower than float32"


@dataclass(frozen=True)
class Hardware:
    """What decides whether bf16 computes natively: torch's CPU kernel level and the CPU's bf16 instructions
    that it uses; the visible GPU (None: none visible to this process) and whether it has bf16 units
    (sm_80+)."""

    cpu_capability: str
    cpu_bf16: bool
    gpu: str | None = None
    gpu_bf16: bool | None = None


def cpu_capability() -> str:
    """torch's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, SVE256, DEFAULT
    ...; ``ATEN_CPU_CAPABILITY`` lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_native_bf16(
    capability: str | None = None, flags: Mapping[str, Any] | None = None, onednn: bool | None = None
) -> bool:
    """bf16 instructions that torch's kernels use: on x86 AVX512-BF16 or AMX-BF16 under torch's AVX512 kernels
    with oneDNN's bf16 matmuls on (``ONEDNN_MAX_CPU_ISA`` can turn them off); on Arm the BF16 extension.
    Without them bf16 is converted in software around every op (an AVX2 CPU, or AVX-512 without BF16)."""
    capability = cpu_capability() if capability is None else capability
    if flags is None:
        get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
        flags = get() if get is not None else {}
    if flags.get("architecture", "").startswith(("aarch64", "arm")):
        return bool(flags.get("bf16") or flags.get("sve_bf16"))
    if capability != "AVX512" or not (flags.get("avx512_bf16") or flags.get("amx_bf16")):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if onednn is None else onednn


def detect_hardware(cuda: bool = False) -> Hardware:
    """This process's :class:`Hardware`; the GPU only with ``cuda`` (a CPU run never touches CUDA)."""
    gpu = gpu_bf16 = None
    if cuda and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        gpu_bf16 = torch.cuda.get_device_capability(0) >= (8, 0)  # Ampere and later: bf16 tensor cores
    return Hardware(cpu_capability(), cpu_has_native_bf16(), gpu, gpu_bf16)


def hardware_keys() -> dict[str, Any]:
    """What a benchmark's JSON line records about the machine: torch's CPU capability, native bf16, the GPU,
    and the environment variables that lowered the CPU's level if any were set."""
    hw = detect_hardware(cuda=True)
    keys = {"cpu_capability": hw.cpu_capability, "cpu_bf16": hw.cpu_bf16, "gpu": hw.gpu}
    limits = [
        f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)
    ]
    if limits:
        keys["cpu_limited_by"] = " ".join(limits)
    return keys


@dataclass(frozen=True)
class DtypeChoice:
    """The resolved ``dtype`` and why, plus a warning for bf16 where it is not native (None otherwise)."""

    dtype: str
    reason: str
    warning: str | None = None

    def lines(self) -> list[str]:
        return [f"dtype {self.dtype} ({self.reason})"] + (
            [f"WARNING: {self.warning}"] if self.warning else []
        )


def choose_dtype(
    requested: str,
    hardware: Hardware | None = None,
    *,
    learner_gpu: bool = False,
    sampler_gpu: bool = False,
    embedded_model: bool = False,
    source: str = "set in the config",
) -> DtypeChoice:
    """The one place that resolves ``dtype``. ``auto``: bfloat16 when every device that computes with the
    weights does it natively (the learner's and the sampler's: a GPU where the config gives them one, this CPU
    otherwise), else float32. A GPU that this process cannot see (a CPU driver of a GPU cluster) counts as
    native (sm_80+). The embedded tiny model stays float32 (its recipe was tuned in float32; at 0.3M
    parameters bf16 gains nothing). An explicit bfloat16 on a device without native bf16 is kept, with a
    warning naming the slowdown."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"config field 'dtype' = {requested!r}: must be one of {list(DTYPE_CHOICES)}")
    hw = hardware if hardware is not None else detect_hardware(cuda=learner_gpu or sampler_gpu)
    placed = (("learner", learner_gpu), ("sampler", sampler_gpu))
    slow = [where for where, on_gpu in placed if not _native(hw, on_gpu)]
    devices = _devices(hw, learner_gpu, sampler_gpu)
    cost = (
        SLOWDOWN
        if any(not on_gpu for where, on_gpu in placed if where in slow)
        else "bf16 emulated on that GPU, slower than float32"
    )
    if requested == "float32":
        return DtypeChoice("float32", source)
    if requested == "bfloat16":
        warning = None
        if slow:
            warning = (
                f"dtype bfloat16 where the {' and the '.join(slow)} cannot compute it natively ({devices}): "
                f"expect {cost} (dtype: auto picks float32 here)"
            )
        return DtypeChoice("bfloat16", f"{source}; {devices}", warning)
    if embedded_model:
        return DtypeChoice("float32", "auto: the embedded tiny model computes in float32")
    if slow:
        return DtypeChoice(
            "float32",
            f"auto: no native bf16 for the {' and the '.join(slow)} ({devices}); bf16 there: {cost}",
        )
    return DtypeChoice("bfloat16", f"auto: native bf16 for the learner and the sampler ({devices})")


def _native(hw: Hardware, on_gpu: bool) -> bool:
    if on_gpu:
        return hw.gpu_bf16 is not False  # None: not visible here, assumed sm_80+
    return hw.cpu_bf16


def _devices(hw: Hardware, learner_gpu: bool, sampler_gpu: bool) -> str:
    """The devices named in the reason: this CPU unless both are on GPUs, the GPU if either is."""
    parts = []
    if not (learner_gpu and sampler_gpu):
        parts.append(f"CPU {hw.cpu_capability} {'with' if hw.cpu_bf16 else 'without'} bf16 instructions")
    if learner_gpu or sampler_gpu:
        units = {
            None: "not visible here, assumed sm_80+",
            True: "with bf16 units",
            False: "without bf16 units",
        }
        parts.append(f"GPU {hw.gpu or ''} {units[hw.gpu_bf16]}".replace("  ", " "))
    return "; ".join(parts)


def resolve_config_dtype(config: Any, announce: Any = print) -> str:
    """``config.dtype`` resolved in place by :func:`choose_dtype` from where the config places the learner
    (``num_gpus_per_learner``) and the samplers (``num_gpus_per_env_runner``), once: on the driver, before the
    algorithm is built, so every process (env runners, learners, evaluator, export) reads the same value and a
    run's config.yaml records it. The first resolution hands its lines to ``announce`` (None: silent). The
    placement fields a config lacks (a bare settings namespace) count as no GPU and the embedded model."""
    fields = vars(config)
    done = fields.get("_dtype_choice")
    if done is not None and done.dtype == config.dtype:
        return config.dtype
    choice = choose_dtype(
        config.dtype,
        learner_gpu=bool(fields.get("num_gpus_per_learner", 0)),
        sampler_gpu=bool(fields.get("num_gpus_per_env_runner", 0)),
        embedded_model=fields.get("model_name_or_path") is None,
    )
    config.dtype, config._dtype_choice = choice.dtype, choice
    for line in choice.lines() if announce is not None else ():
        announce(line)
    return choice.dtype


def resolve_cpu_dtype(requested: str, announce: Any = print, source: str = "set in the config") -> str:
    """:func:`choose_dtype` for a model that computes on this CPU alone (`treerpo eval`'s hf backend)."""
    choice = choose_dtype(requested, source=source)
    for line in choice.lines() if announce is not None else ():
        announce(line)
    return choice.dtype
