"""`treerpo eval`: evaluate a model on a reasoning env -> summary.json + problems.jsonl.

The model (``--model``) may be:

- a Hugging Face model folder (has config.json), loaded with ``from_pretrained``;
- a `treerpo train` output folder: its ``final_model/`` if the run finished, else its latest checkpoint;
- an RLlib checkpoint of TreeRPO (``OUTPUT/checkpoints/iter_N`` or any ``algo.save_to_path`` folder): the
  policy weights are read from the learner state ``learner_group/learner/rl_module/default_policy`` (the
  learner holds the trained policy) on top of the base model the checkpoint's config names;
- a hub name (``org/name``), when no such local path exists (needs network).

For a checkpoint or training output the training config supplies the defaults: the env with its held-out
``eval_env_config``, ``max_new_tokens`` = step_tokens x tree depth, temperature, chat template, system
prompt, dtype and backend. A plain model folder needs ``--env``.

The numbers come from :class:`rllib_treerpo.sampling.evaluation.Evaluator`: pass@1 (mean over the K samples),
pass@K, greedy accuracy (one greedy decode per problem, ``--no-greedy`` skips it) and mean response tokens.
Problems are ``reset(options={"problem_index": i})`` for i < ``--problems`` (capped at the env's
``num_problems`` when it has one).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rllib_treerpo.config.settings import JOB_FIELDS
from rllib_treerpo.learner.precision import resolve_cpu_dtype
from rllib_treerpo.models.model_io import ResolvedModel, check_model_config, load_policy, resolve_model
from rllib_treerpo.sampling.sampler import TreeSpec

__all__ = ["eval_model", "format_summary"]


def _progress_printer(total: int, enabled: bool):
    """A tqdm bar when tqdm is available (it comes with transformers), else a printed line per batch."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        start = time.perf_counter()

        def show(done: int, n: int) -> None:
            print(
                f"eval: {done}/{n} problems ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True
            )

        return show, lambda: None
    bar = tqdm(total=total, unit="problem", desc="eval", file=sys.stderr)

    def update(done: int, n: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


@dataclass
class EvalOptions:
    """What `treerpo eval` was asked for; ``None`` takes the training run's value, else a default
    (eval_model)."""

    env: str | None = None
    env_config: dict[str, Any] | None = None
    samples: int | None = None
    greedy: bool = True
    problems: int | None = None
    output: str | Path | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int = 0
    chat_template: bool | None = None
    system_prompt: str | None = None
    dtype: str | None = None
    backend: str | None = None
    batch_problems: int = 50
    progress: bool = True

    def check(self) -> None:
        for name in ("samples", "problems", "batch_problems", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(
                f"--temperature must be > 0 (greedy decoding is --greedy), got {self.temperature!r}"
            )


def read_eval_config(path: str | Path) -> dict[str, Any]:
    """The options of an eval config file (configs/eval/*.yaml); an unknown key is one line naming it."""
    from rllib_treerpo.config.config_files import read_config_file

    values = read_config_file(path)
    known = set(EvalOptions.__dataclass_fields__) - {"output", "progress"}
    for key in values:
        if key not in known:
            raise ValueError(f"{path}: unknown eval option {key!r}; known: {sorted(known)}")
    return values


def default_model() -> tuple[str, dict[str, Any]]:
    """The embedded default model (built and cached as `treerpo train` builds it) and its run's settings."""
    from rllib_treerpo.jobs.config import flat_config, load_run_config
    from rllib_treerpo.jobs.train import use_embedded_model

    config, job, _ = load_run_config(None, announce=None)
    use_embedded_model(config, job)
    return config.model_name_or_path, flat_config(config, job)


def eval_model(model: str | None, **options: Any) -> dict[str, Any]:
    """Evaluate ``model`` (module docstring) and write ``summary.json`` and ``problems.jsonl`` to ``output``.

    ``options`` are :class:`EvalOptions`' fields. ``None`` ones take the training config's value when the
    model comes from a TreeRPO run (so the defaults reproduce `treerpo train`'s eval_after.json), else the
    defaults: 4 samples, 100 problems, max_new_tokens 256, temperature 1.0, no chat template, float32, hf
    backend. Returns the summary (pass@1, pass@K, greedy_accuracy, mean_response_tokens, settings, seconds,
    output).
    """
    from envs import make_reasoning_env
    from rllib_treerpo.sampling.evaluation import Evaluator
    from rllib_treerpo.sampling.prompts import prompt_tokenizer

    o = EvalOptions(**options)
    o.check()
    resolved = _resolve(model)
    s = _settings(resolved, o)
    _check_env_id(s["env"])
    check_model_config(
        resolved.path if resolved.kind == "hf" else resolved.train_config.get("model_name_or_path")
    )
    env_instance = make_reasoning_env(s["env"], s["env_config"])
    limit = getattr(env_instance, "num_problems", None)
    if isinstance(limit, int) and s["problems"] > limit:
        print(
            f"eval: the env has {limit} problems; evaluating all of them (--problems {s['problems']})",
            file=sys.stderr,
        )
        s["problems"] = limit
    try:
        net, tokenizer, base = load_policy(resolved, s["dtype"])
    except ValueError as e:
        raise ValueError(f"--model {e}") from None
    prompt_tok = prompt_tokenizer(
        tokenizer, chat_template=s["chat_template"], system_prompt=s["system_prompt"]
    )
    print(
        f"eval: {resolved.description} on {s['env']} {s['env_config']}: {s['problems']} problems x "
        f"{s['samples']} samples{' + greedy' if o.greedy else ''}, max {s['max_new_tokens']} new tokens, "
        f"temperature {s['temperature']}",
        file=sys.stderr,
        flush=True,
    )
    update, close = _progress_printer(s["problems"], o.progress)
    start = time.perf_counter()
    try:
        evaluator = Evaluator(
            env_instance,
            _backend(s, resolved, net, tokenizer, base, env_instance, prompt_tok),
            prompt_tok,
            problems=s["problems"],
            samples=s["samples"],
            max_new_tokens=s["max_new_tokens"],
            temperature=s["temperature"],
            greedy=o.greedy,
            seed=o.seed,
            batch_problems=o.batch_problems,
        )
        summary, rows = evaluator(progress=update)
    finally:
        close()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["settings"] = {
        "model": str(model or resolved.path),
        "resolved_model": resolved.path,
        "model_kind": resolved.kind,
        "base_model": base,
        **s,
        "greedy": o.greedy,
        "seed": o.seed,
    }
    out = Path(o.output) if o.output is not None else Path("runs") / "eval" / _default_name(resolved)
    _write_outputs(out, summary, rows, tokenizer if prompt_tok is not tokenizer else None, s)
    summary["output"] = str(out)
    return summary


def _backend(
    s: dict, resolved: ResolvedModel, net: Any, tokenizer: Any, base: str, env: Any, prompt_tok: Any
):
    """The backend: hf around ``net``; vllm: the process's engine on the base model with the evaluated weights
    loaded (a checkpoint's are not in the base folder), max_model_len the run's, else twice the longest prompt
    measured + max_new_tokens."""
    from rllib_treerpo.config.preflight import _longest_prompt
    from rllib_treerpo.config.settings import FIELDS
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.generation.vllm import VLLMBackend
    from rllib_treerpo.generation.vllm_engine import CPU_EVAL_SHARE, on_cpu

    if s["backend"] != "vllm":
        return make_backend(s["backend"], net, tokenizer)
    tc = resolved.train_config
    max_len = tc.get("max_model_len") or min(
        int(net.config.max_position_embeddings), 2 * _longest_prompt(env, prompt_tok)[0] + s["max_new_tokens"]
    )
    backend = VLLMBackend.from_pretrained(
        base,
        tokenizer,
        dtype=s["dtype"],
        max_model_len=max_len,
        gpu_memory_utilization=tc.get("gpu_memory_utilization")
        or (CPU_EVAL_SHARE if on_cpu() else FIELDS["gpu_memory_utilization"].default),
        enforce_eager=bool(tc.get("enforce_eager", False)),
    )
    if resolved.kind != "hf":
        backend.load_weights(net.state_dict())
    return backend


def _resolve(model: str | None) -> ResolvedModel:
    """``--model`` classified (model_io.resolve_model); none: the embedded default, like a run of the
    defaults."""
    if model is None:
        path, defaults = default_model()
        return ResolvedModel("hf", path, defaults, f"the embedded default model {path}")
    try:  # cheap checks first: path, then env, then the model load
        return resolve_model(model)
    except ValueError as e:
        raise ValueError(f"--model {e}") from None


def _announce(line: str) -> None:
    """The dtype and why, on stdout like `treerpo train`'s (stderr's first line is an error's, when one
    comes)."""
    print(f"eval: {line}", flush=True)


def _settings(resolved: ResolvedModel, o: EvalOptions) -> dict[str, Any]:
    """The evaluation settings: what was given, else the training run's, else the defaults."""
    tc = resolved.train_config
    given = vars(o)
    env, env_config = o.env, o.env_config
    if env is None:
        if not tc.get("env"):
            raise ValueError(
                f"--env is required: {resolved.description} carries no training config to take the "
                "env from (e.g. --env treerpo/Arithmetic-v0 --env-config split=test)"
            )
        env = str(tc["env"])
        # A bare checkpoint's config has no job fields: the job's default held-out settings apply.
        held_out = tc.get("eval_env_config", JOB_FIELDS["eval_env_config"].default) or {}
        env_config = {**(tc.get("env_config") or {}), **held_out, **(env_config or {})}

    def pick(name: str, default: Any) -> Any:  # given, else the run's, else the default
        for value in (given[name], tc.get(name)):
            if value is not None:
                return value
        return default

    return {
        "env": env,
        "env_config": dict(env_config or {}),
        "samples": int(given["samples"] or tc.get("eval_samples") or 4),
        "problems": int(given["problems"] or tc.get("eval_problems") or 100),
        "max_new_tokens": given["max_new_tokens"] or (response_budget(tc) if tc.get("branching") else 256),
        "temperature": float(pick("temperature", 1.0)),
        "chat_template": bool(pick("chat_template", False)),
        "system_prompt": pick("system_prompt", None),
        "dtype": resolve_cpu_dtype(pick("dtype", "auto"), _announce, "--dtype or the training run's"),
        "backend": pick("backend", "hf"),
    }


def _write_outputs(
    out: Path, summary: dict, rows: list[dict], chat_tokenizer: Any, s: dict[str, Any]
) -> None:
    """problems.jsonl (with the templated prompt the model saw, when there was a template) and
    summary.json."""
    from rllib_treerpo.sampling.prompts import format_prompt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "problems.jsonl", "w") as f:
        for row in rows:
            if chat_tokenizer is not None:
                row["model_prompt"] = format_prompt(
                    chat_tokenizer,
                    row["prompt"],
                    chat_template=s["chat_template"],
                    system_prompt=s["system_prompt"],
                )
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def response_budget(train_config: dict[str, Any]) -> int:
    """The training run's response budget (depth x step_tokens), from its flat config."""
    return TreeSpec(tuple(train_config["branching"]), int(train_config["step_tokens"])).response_tokens


def _check_env_id(env: str) -> None:
    """An unknown gymnasium id is a ValueError naming it and the closest registered ids."""
    import difflib

    import gymnasium

    import envs  # noqa: F401  registers the treerpo/* ids

    if ":" in env:  # "module:id": gymnasium imports the module, which registers the id
        return
    if env not in gymnasium.registry:
        ids = sorted(gymnasium.registry)
        close = difflib.get_close_matches(env, ids, n=3, cutoff=0.6)
        ours = [i for i in ids if i.startswith("treerpo/")]
        hint = (
            f"did you mean {', '.join(map(repr, close))}?" if close else f"registered reasoning envs: {ours}"
        )
        raise ValueError(
            f"--env {env!r}: unknown environment id; {hint} (a module that registers it can be "
            "named as 'module:id')"
        )


def _default_name(resolved: ResolvedModel) -> str:
    """runs/eval/<name>: RUN-iter_N for a run's checkpoint, RUN for a run's final model, else the folder
    name."""
    p = Path(resolved.path)
    if p.parent.name == "checkpoints":
        name = f"{p.parent.parent.name}-{p.name}"
    elif p.name == "final_model":
        name = p.parent.name
    else:
        name = p.name
    return re.sub(r"[^\w.-]+", "_", name) or "model"


def format_summary(summary: dict[str, Any]) -> str:
    """One line: pass@1, pass@K, greedy accuracy, mean response tokens, problems, seconds."""
    k = summary.get("samples", 1)
    parts = [
        f"pass@1 {summary.get('pass@1', float('nan')):.3f}",
        f"pass@{k} {summary.get(f'pass@{k}', float('nan')):.3f}",
    ]
    if "greedy_accuracy" in summary:
        parts.append(f"greedy {summary['greedy_accuracy']:.3f}")
    parts.append(f"mean response tokens {summary.get('mean_response_tokens', float('nan')):.1f}")
    parts.append(f"{summary.get('problems', 0)} problems, {summary.get('seconds', 0):.0f}s")
    return "  ".join(parts)
