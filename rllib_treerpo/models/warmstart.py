"""Supervised warm start on demonstrations: the tiny default model learns the response format first.

RL from a random model never sees a reward; a short SFT on the env's (deliberately imperfect) demonstrations
gives a policy that solves some problems when sampling, so TreeRPO has signal and room to improve. Torch only.

The same settings build a different model on another CPU (float kernels differ with the instruction set), so
the warm start of the job's defaults is shipped with the package (``models/embedded/``, with its build record
``build.json``) and used wherever its fingerprint matches the settings asked for: every machine starts
``make train`` from the same weights. Other settings (or ``TREERPO_BUILD_WARMSTART=1``) build into the cache.
Rebuild the shipped one (after changing the defaults) with::

    OMP_NUM_THREADS=1 python -m rllib_treerpo.models.warmstart
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHIPPED = Path(__file__).resolve().parent / "embedded"
RECORD = "build.json"
BUILD_ENV = "TREERPO_BUILD_WARMSTART"  # "1": ignore the shipped warm start, build (or reuse) the cache's
REBUILD = "OMP_NUM_THREADS=1 python -m rllib_treerpo.models.warmstart"
# Recorded with a build: the settings that change a CPU's float kernels or torch's threads.
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cache_dir() -> Path:
    """Where built models are cached: ``$TREERPO_CACHE``, else ~/.cache/rllib_treerpo (read at each call)."""
    return Path(os.environ.get("TREERPO_CACHE", Path.home() / ".cache" / "rllib_treerpo"))


def encode_demonstrations(tokenizer, demos: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) right-padded ids of prompt + response + EOS and a (N, T) mask of the response and EOS tokens."""
    encoded = []
    for prompt, response in demos:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p, r))
    width = max(len(p) + len(r) for p, r in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((len(encoded), width), pad, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.float32)
    for i, (p, r) in enumerate(encoded):
        ids[i, : len(p) + len(r)] = p + r
        mask[i, len(p) : len(p) + len(r)] = 1.0
    return ids, mask


def sft(
    model: torch.nn.Module,
    tokenizer,
    demos: list[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Next-token cross-entropy on response tokens only; AdamW, linear warmup then cosine decay.

    Returns the loss of every step. ``progress(step, loss)`` is called every 50 steps.
    """
    ids, mask = encode_demonstrations(tokenizer, demos)
    ids_t = torch.from_numpy(ids)
    mask_t = torch.from_numpy(mask)
    gen = np.random.default_rng(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    losses = []
    for step in range(steps):
        pick = torch.from_numpy(gen.integers(0, len(ids), batch_size))
        x = ids_t[pick].to(device)
        m = mask_t[pick].to(device)
        width = int(m.nonzero()[:, 1].max()) + 1  # trim shared right padding
        x = x[:, :width]
        m = m[:, :width]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
        ).view_as(m[:, 1:])
        loss = (nll * m[:, 1:]).sum() / m[:, 1:].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None and (step % 50 == 0 or step == steps - 1):
            progress(step, loss.item())
    model.eval()
    return losses


def _settings(
    env: Any, env_config: dict | None, tiny_model: dict | None, warmstart: dict | None
) -> dict[str, Any]:
    """Everything the warm start's weights depend on (None: the job's defaults, settings.JOB_FIELDS)."""
    from rllib_treerpo.config.settings import JOB_FIELDS

    tiny = dict(JOB_FIELDS["tiny_model"].default if tiny_model is None else tiny_model)
    # A warmstart mapping gives any of its keys: the others are the job field's default (seed: 0).
    ws = {"seed": 0, **JOB_FIELDS["warmstart"].default, **(warmstart or {})}
    # "v": the version of the build code (sft, build_tiny_model): raise it when a change alters the weights.
    return {"tiny": tiny, "warmstart": ws, "env": str(env), "env_config": env_config or {}, "v": 1}


def fingerprint(
    env: Any, env_config: dict | None, tiny_model: dict | None = None, warmstart: dict | None = None
) -> str:
    """sha256 of the settings the warm start is built from (:func:`_settings`): equal settings, equal
    fingerprint. A build record carries it; the cache folder is named by its first 12 characters."""
    key = json.dumps(_settings(env, env_config, tiny_model, warmstart), sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def embedded_model_folder(
    env: Any, env_config: dict | None, tiny_model: dict | None = None, warmstart: dict | None = None
) -> Path:
    """Where the embedded model of these settings is built and cached when the shipped one does not match
    (None: the job's defaults, settings.JOB_FIELDS)."""
    return cache_dir() / f"warmstart-{fingerprint(env, env_config, tiny_model, warmstart)[:12]}"


def read_record(folder: str | Path) -> dict | None:
    """The build record of a model folder (``build.json``), None when it has none."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_model(key: str) -> str | None:
    """The shipped warm start's folder when its record's fingerprint is ``key``, else None."""
    record = read_record(SHIPPED)
    if record is None or record.get("fingerprint") != key or not (SHIPPED / "config.json").is_file():
        return None
    return str(SHIPPED)


def copy_record(model_folder: str | Path, run_folder: str | Path) -> None:
    """A run records how its model was built: the model folder's build record, as ``warmstart_build.json``
    in the run folder (nothing when the model has no record, e.g. a hub model)."""
    source = Path(model_folder) / RECORD
    if source.is_file():
        shutil.copyfile(source, Path(run_folder) / "warmstart_build.json")


def embedded_model(
    env: Any,
    env_config: dict | None,
    tiny_model: dict | None = None,
    warmstart: dict | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """The embedded default model: the tiny char-level model warm-started on the env's demonstrations.

    The shipped warm start (``models/embedded``) when its fingerprint matches these settings and
    ``$TREERPO_BUILD_WARMSTART`` is not 1; else built once per settings and cached
    (:func:`embedded_model_folder`, ``$TREERPO_CACHE``). Returns the Hugging Face folder. ``tiny_model`` /
    ``warmstart`` None: the job's defaults (what `make train` uses).
    """
    key = fingerprint(env, env_config, tiny_model, warmstart)
    shipped = None if os.environ.get(BUILD_ENV) == "1" else shipped_model(key)
    if shipped is not None:
        log(f"warm start: the shipped model {shipped} (fingerprint {key[:12]})")
        return shipped
    folder = embedded_model_folder(env, env_config, tiny_model, warmstart)
    if (folder / "config.json").exists():
        log(f"warm start: cached model {folder}")
        return str(folder)
    return build(folder, env, env_config, tiny_model, warmstart, log=log)


def build(
    folder: str | Path,
    env: Any,
    env_config: dict | None,
    tiny_model: dict | None = None,
    warmstart: dict | None = None,
    *,
    log: Callable[[str], None] = print,
    command: str | None = None,
    replace: bool = False,
    held_out_problems: int | None = None,
) -> str:
    """Build the warm start of these settings into ``folder`` (weights, tokenizer, build record); returns the
    folder. Written beside it, then renamed: a half-written folder is never picked up. ``replace``: an
    existing folder is replaced (else a folder another process finished first is kept).
    ``held_out_problems``: the recorded evaluation's size (None: the job's eval_problems)."""
    from envs import make_reasoning_env

    settings = _settings(env, env_config, tiny_model, warmstart)
    instance = make_reasoning_env(env, env_config)
    if not hasattr(instance, "demonstrations"):
        raise ValueError(
            f"config field 'model_name_or_path' is null, but env {env!r} has no demonstrations() to "
            "warm-start the tiny model: give a model_name_or_path"
        )
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    seconds, loss = _train(instance, settings, tmp, log)
    record = {
        "fingerprint": fingerprint(env, env_config, tiny_model, warmstart),
        "settings": settings,
        **_machine(),
        "sft_seconds": round(seconds, 3),
        "final_loss": round(loss, 4),
        "held_out": _held_out(tmp, env, env_config, log, held_out_problems),
        "weights_sha256": hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if replace and folder.exists():
        shutil.rmtree(folder)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same model first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _train(instance: Any, settings: dict, out: Path, log: Callable[[str], None]) -> tuple[float, float]:
    """The SFT of the tiny model, saved (weights and tokenizer) to ``out``: (seconds, final loss)."""
    from rllib_treerpo.models.tiny import build_char_tokenizer, build_tiny_model

    ws = settings["warmstart"]
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer),
        seed=ws["seed"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings["tiny"],
    )
    demos = instance.demonstrations(ws["demos"], seed=ws["seed"], error_rate=ws["error_rate"])
    log(
        f"warm start: SFT of a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter model on "
        f"{len(demos)} demonstrations ({ws['error_rate']:.0%} step errors), {ws['steps']} steps"
    )
    torch.manual_seed(ws["seed"])
    start = time.perf_counter()
    losses = sft(
        model,
        tokenizer,
        demos,
        steps=ws["steps"],
        batch_size=ws["batch_size"],
        lr=ws["lr"],
        seed=ws["seed"],
        progress=lambda s, loss: log(
            f"  sft step {s + 1}/{ws['steps']} loss {loss:.3f} ({time.perf_counter() - start:.0f}s)"
        ),
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return seconds, losses[-1]


def _machine() -> dict[str, Any]:
    """What the build's numerics depend on besides its settings."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "numerics_env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
    }


def _held_out(
    folder: Path, env: Any, env_config: dict | None, log: Callable[[str], None], problems: int | None = None
) -> dict:
    """The built model on the job's held-out evaluation (the job's defaults: test split, 200 problems x 16
    samples at T=1 plus greedy, seed 0, the default tree's response budget): what `treerpo train` reports as
    ``eval_before`` for run seed 0."""
    from envs import make_reasoning_env
    from rllib_treerpo.config.settings import FIELDS, JOB_FIELDS
    from rllib_treerpo.sampling.evaluation import Evaluator

    test = make_reasoning_env(env, {**(env_config or {}), **JOB_FIELDS["eval_env_config"].default})
    start = time.perf_counter()
    evaluator = Evaluator.from_model(
        str(folder),
        test,
        problems=problems or JOB_FIELDS["eval_problems"].default,
        samples=JOB_FIELDS["eval_samples"].default,
        max_new_tokens=FIELDS["step_tokens"].default * len(FIELDS["branching"].default),
        temperature=FIELDS["temperature"].default,
        seed=0,
        backend_kwargs={"max_batch": FIELDS["generation_batch"].default},  # batch shapes move float sums
    )
    summary, _ = evaluator()
    keys = ("pass@1", "greedy_accuracy", "mean_response_tokens", "problems", "samples")
    out = {k: summary[k] for k in keys if k in summary}
    greedy = out.get("greedy_accuracy", float("nan"))
    log(f"warm start: held-out pass@1 {out['pass@1']:.3f} greedy {greedy:.3f}")
    return {**out, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    """Build the warm start of the job's defaults (what ``model_name_or_path: null`` means) into --out,
    by default the shipped folder: run it after changing the defaults, and commit the folder."""
    import argparse

    from rllib_treerpo.config.settings import RLLIB_FIELD_CHECKS

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default=str(SHIPPED), help="the model folder to (re)write")
    args = parser.parse_args(argv)
    env = RLLIB_FIELD_CHECKS["env"].default
    env_config = RLLIB_FIELD_CHECKS["env_config"].default
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (
        "" if threads is None else f"OMP_NUM_THREADS={threads} "
    ) + "python -m rllib_treerpo.models.warmstart"
    if Path(args.out).resolve() != SHIPPED:
        command += f" --out {args.out}"
    folder = build(
        args.out, env, env_config, log=lambda m: print(m, flush=True), command=command, replace=True
    )
    print(json.dumps(read_record(folder)))


if __name__ == "__main__":
    main()
