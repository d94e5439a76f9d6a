"""Supervised warm start on demonstrations: the tiny default model learns the response format first.

RL from a random model never sees a reward; a short SFT on the env's (deliberately imperfect) demonstrations
gives a policy that solves some problems when sampling, so TreeRPO has signal and room to improve. Torch only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def embedded_model_folder(
    env: Any, env_config: dict | None, tiny_model: dict | None = None, warmstart: dict | None = None
) -> Path:
    """Where the embedded model of these settings is cached (None: the job's defaults,
    settings.JOB_FIELDS)."""
    tiny_model, ws = _settings(tiny_model, warmstart)
    key = json.dumps(
        {"tiny": tiny_model, "warmstart": ws, "env": str(env), "env_config": env_config or {}, "v": 1},
        sort_keys=True,
        default=str,
    )
    return cache_dir() / f"warmstart-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _settings(tiny_model: dict | None, warmstart: dict | None) -> tuple[dict, dict]:
    from rllib_treerpo.config.settings import JOB_FIELDS

    tiny = dict(JOB_FIELDS["tiny_model"].default if tiny_model is None else tiny_model)
    # A warmstart mapping gives any of its keys: the others are the job field's default (seed: 0).
    ws = {"seed": 0, **JOB_FIELDS["warmstart"].default, **(warmstart or {})}
    return tiny, ws


def embedded_model(
    env: Any,
    env_config: dict | None,
    tiny_model: dict | None = None,
    warmstart: dict | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """The embedded default model: the tiny char-level model warm-started on the env's demonstrations.

    Built once per settings and cached (:func:`embedded_model_folder`, ``$TREERPO_CACHE``); returns the
    Hugging Face folder. ``tiny_model`` / ``warmstart`` None: the job's defaults (what `make train` builds).
    """
    from envs import make_reasoning_env
    from rllib_treerpo.models.tiny import build_char_tokenizer, build_tiny_model

    folder = embedded_model_folder(env, env_config, tiny_model, warmstart)
    tiny_model, ws = _settings(tiny_model, warmstart)
    if (folder / "config.json").exists():
        log(f"warm start: cached model {folder}")
        return str(folder)
    instance = make_reasoning_env(env, env_config)
    if not hasattr(instance, "demonstrations"):
        raise ValueError(
            f"config field 'model_name_or_path' is null, but env {env!r} has no demonstrations() to "
            "warm-start the tiny model: give a model_name_or_path"
        )
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer),
        seed=ws["seed"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **tiny_model,
    )
    demos = instance.demonstrations(ws["demos"], seed=ws["seed"], error_rate=ws["error_rate"])
    log(
        f"warm start: SFT of a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter model on "
        f"{len(demos)} demonstrations ({ws['error_rate']:.0%} step errors), {ws['steps']} steps"
    )
    torch.manual_seed(ws["seed"])
    start = time.perf_counter()
    sft(
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
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # atomic: a half-written cache is never picked up
    except OSError:  # another process finished the same model first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
