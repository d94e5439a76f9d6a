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

The numbers come from :func:`rllib_treerpo.evaluate.evaluate`: pass@1 (mean over the K samples), pass@K,
greedy accuracy (one greedy decode per problem, ``--no-greedy`` skips it) and mean response tokens.
Problems are ``reset(options={"problem_index": i})`` for i < ``--problems`` (capped at the env's
``num_problems`` when it has one).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ResolvedModel", "eval_model", "load_model", "resolve_model"]

MODULE_PATH = Path("learner_group") / "learner" / "rl_module" / "default_policy"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = ("float32", "bfloat16")


@dataclass
class ResolvedModel:
    """Where the weights are: ``kind`` is "hf" (``path`` is a folder or hub name) or "checkpoint"."""

    kind: str
    path: str
    train_config: dict[str, Any] = field(default_factory=dict)  # empty for a plain model
    description: str = ""


def _is_hf_folder(p: Path) -> bool:
    return (p / "config.json").is_file()


def _is_checkpoint(p: Path) -> bool:
    return (p / "rllib_checkpoint.json").is_file()


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    latest = ckpt_dir / "latest"
    if latest.is_file():
        target = ckpt_dir / latest.read_text().strip()
        if _is_checkpoint(target):
            return target
    found = sorted(p for p in ckpt_dir.glob("iter_*") if _is_checkpoint(p))
    return found[-1] if found else None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    return values if isinstance(values, dict) else {}


def _checkpoint_config(ckpt: Path) -> dict[str, Any]:
    """The training config of a checkpoint: the run's config.yaml if it sits in a `treerpo train` output
    folder, else the algorithm config stored in the checkpoint itself."""
    run_config = ckpt.parent.parent / "config.yaml"
    if ckpt.parent.name == "checkpoints" and run_config.is_file():
        return _read_yaml(run_config)
    import pickle

    import ray.rllib  # noqa: F401  the pickle holds RLlib classes

    try:
        with open(ckpt / "class_and_ctor_args.pkl", "rb") as f:
            ctor = pickle.load(f)
        config = ctor["ctor_args_and_kwargs"][0][0]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is "not a TreeRPO checkpoint"
        raise ValueError(f"--model {ckpt}: cannot read the algorithm config of this RLlib checkpoint ({e})") from e
    if not isinstance(config, dict):
        config = config.to_dict()
    return config


def resolve_model(path: str) -> ResolvedModel:
    """Classify ``--model`` (module docstring); a path that is none of these is a ValueError naming it."""
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_NAME.match(path) and not path.startswith((".", "/", "~")):
            return ResolvedModel("hf", path, description=f"hub model {path}")
        raise ValueError(f"--model {path}: no such file or folder")
    if not p.is_dir():
        raise ValueError(f"--model {path}: is a file; expected a model folder, a `treerpo train` output "
                         "folder or an RLlib checkpoint folder")
    if _is_hf_folder(p):
        run_config = p.parent / "config.yaml"  # OUTPUT/final_model: the run's config gives the defaults
        train_config = _read_yaml(run_config) if p.name == "final_model" and run_config.is_file() else {}
        return ResolvedModel("hf", str(p), train_config, f"Hugging Face model {p}")
    if _is_checkpoint(p):
        if not (p / MODULE_PATH).is_dir():
            raise ValueError(f"--model {path}: an RLlib checkpoint without {MODULE_PATH} (the learner's policy); "
                             "not a TreeRPO checkpoint?")
        return ResolvedModel("checkpoint", str(p), _checkpoint_config(p), f"checkpoint {p}")
    if (p / "final_model").is_dir() and _is_hf_folder(p / "final_model"):
        train_config = _read_yaml(p / "config.yaml") if (p / "config.yaml").is_file() else {}
        return ResolvedModel("hf", str(p / "final_model"), train_config, f"final model of the run {p}")
    for ckpt_dir in (p / "checkpoints", p):
        if ckpt_dir.is_dir() and (ckpt := _latest_checkpoint(ckpt_dir)) is not None:
            return resolve_model(str(ckpt))
    raise ValueError(f"--model {path}: not a model: expected a Hugging Face model folder (config.json), a "
                     "`treerpo train` output folder (final_model/ or checkpoints/latest) or an RLlib checkpoint "
                     "folder (rllib_checkpoint.json)")


def load_model(resolved: ResolvedModel, dtype: str = "float32"):
    """``(model, tokenizer, base_model)``: the policy as a transformers causal LM in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: must be one of {list(_DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    if resolved.kind == "hf":
        try:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        except OSError as e:
            raise ValueError(f"--model {resolved.path}: cannot load it: {str(e).splitlines()[0]}") from e
        return model.eval(), tokenizer, resolved.path

    base = resolved.train_config.get("model_name_or_path")
    if not base:
        raise ValueError(f"--model {resolved.path}: the checkpoint's config has no model_name_or_path")
    module_dir = Path(resolved.path) / MODULE_PATH
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as e:
        raise ValueError(f"--model {resolved.path}: its base model {base!r} (model_name_or_path) cannot be "
                         f"loaded: {str(e).splitlines()[0]}") from e
    state = _read_module_state(module_dir)
    weights = {k.removeprefix("model."): torch.as_tensor(v) for k, v in state.items()}
    try:
        model.load_state_dict(weights, strict=True)  # as train.export_model does
    except RuntimeError as e:
        raise ValueError(f"--model {resolved.path}: the checkpoint's weights do not fit its base model {base!r}: "
                         f"{str(e).splitlines()[0]}") from e
    return model.eval(), tokenizer, base


def _read_module_state(module_dir: Path) -> dict[str, Any]:
    """The RLModule state file of an RLlib checkpoint (``module_state.pkl`` or ``.msgpack``)."""
    pkl, msg = module_dir / "module_state.pkl", module_dir / "module_state.msgpack"
    if pkl.is_file():
        import pickle

        with open(pkl, "rb") as f:
            return pickle.load(f)
    if msg.is_file():
        from ray.rllib.utils.checkpoints import try_import_msgpack

        msgpack = try_import_msgpack(error=True)
        with open(msg, "rb") as f:
            return msgpack.load(f, strict_map_key=False)
    raise ValueError(f"--model: no module_state.pkl or module_state.msgpack in {module_dir}")


def _progress_printer(total: int, enabled: bool):
    """A tqdm bar when tqdm is available (it comes with transformers), else a printed line per batch."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        start = time.perf_counter()

        def show(done: int, n: int) -> None:
            print(f"eval: {done}/{n} problems ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)

        return show, lambda: None
    bar = tqdm(total=total, unit="problem", desc="eval", file=sys.stderr)

    def update(done: int, n: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


def eval_model(
    model: str,
    *,
    env: str | None = None,
    env_config: dict[str, Any] | None = None,
    samples: int | None = None,
    greedy: bool = True,
    problems: int | None = None,
    output: str | Path | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    seed: int = 0,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    dtype: str | None = None,
    backend: str | None = None,
    batch_problems: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` (module docstring) and write ``summary.json`` and ``problems.jsonl`` to ``output``.

    ``None`` arguments take the training config's value when the model comes from a TreeRPO run (so the
    defaults reproduce `treerpo train`'s eval_after.json), else the defaults: 4 samples, 100 problems,
    max_new_tokens 256, temperature 1.0, no chat template, float32, hf backend. Returns the summary
    (pass@1, pass@K, greedy_accuracy, mean_response_tokens, settings, seconds).
    """
    from rllib_treerpo.env_runner import make_reasoning_env
    from rllib_treerpo.evaluate import evaluate
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.prompts import format_prompt, prompt_tokenizer

    for name, value in (("--samples", samples), ("--problems", problems), ("--batch-problems", batch_problems)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (greedy decoding is --greedy), got {temperature!r}")

    resolved = resolve_model(model)  # cheap checks first: path, then env, then the model load
    tc = resolved.train_config
    if env is None:
        if not tc.get("env"):
            raise ValueError(f"--env is required: {resolved.description} carries no training config to take the "
                             "env from (e.g. --env treerpo/Arithmetic-v0 --env-config split=test)")
        env = str(tc["env"])
        env_config = {**(tc.get("env_config") or {}), **(tc.get("eval_env_config") or {}), **(env_config or {})}
    env_config = dict(env_config or {})
    if samples is None:
        samples = int(tc.get("eval_samples") or 4)
    if problems is None:
        problems = int(tc.get("eval_problems") or 100)
    if max_new_tokens is None:
        max_new_tokens = int(tc["step_tokens"]) * len(tc["branching"]) if tc.get("branching") else 256
    temperature = float(tc.get("temperature", 1.0)) if temperature is None else float(temperature)
    chat_template = bool(tc.get("chat_template", False)) if chat_template is None else chat_template
    system_prompt = tc.get("system_prompt") if system_prompt is None else system_prompt
    dtype = dtype or tc.get("dtype") or "float32"
    backend = backend or tc.get("backend") or "hf"

    _check_env_id(env)
    env_instance = make_reasoning_env(env, env_config)
    limit = getattr(env_instance, "num_problems", None)
    if isinstance(limit, int) and problems > limit:
        print(f"eval: the env has {limit} problems; evaluating all of them (--problems {problems})", file=sys.stderr)
        problems = limit

    net, tokenizer, base = load_model(resolved, dtype)
    prompt_tok = prompt_tokenizer(tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    gen = make_backend(backend, net, tokenizer)
    print(f"eval: {resolved.description} on {env} {env_config}: {problems} problems x {samples} samples"
          f"{' + greedy' if greedy else ''}, max {max_new_tokens} new tokens, temperature {temperature}",
          file=sys.stderr, flush=True)
    update, close = _progress_printer(problems, progress)
    start = time.perf_counter()
    try:
        summary, rows = evaluate(env_instance, gen, prompt_tok, num_problems=problems, samples=samples,
                                 max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, seed=seed,
                                 batch_problems=batch_problems, progress=update)
    finally:
        close()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["settings"] = {
        "model": str(model), "resolved_model": resolved.path, "model_kind": resolved.kind, "base_model": base,
        "env": env, "env_config": env_config, "samples": samples, "greedy": greedy, "problems": problems,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
        "chat_template": chat_template, "system_prompt": system_prompt, "dtype": dtype, "backend": backend,
    }

    out = Path(output) if output is not None else Path("runs") / "eval" / _default_name(resolved)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "problems.jsonl", "w") as f:
        for row in rows:
            if prompt_tok is not tokenizer:
                row["model_prompt"] = format_prompt(tokenizer, row["prompt"], chat_template=chat_template,
                                                    system_prompt=system_prompt)
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["output"] = str(out)
    return summary


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
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"registered reasoning envs: {ours}"
        raise ValueError(f"--env {env!r}: unknown environment id; {hint} (a module that registers it can be "
                         "named as 'module:id')")


def _default_name(resolved: ResolvedModel) -> str:
    """runs/eval/<name>: RUN-iter_N for a run's checkpoint, RUN for a run's final model, else the folder name."""
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
    parts = [f"pass@1 {summary.get('pass@1', float('nan')):.3f}", f"pass@{k} {summary.get(f'pass@{k}', float('nan')):.3f}"]
    if "greedy_accuracy" in summary:
        parts.append(f"greedy {summary['greedy_accuracy']:.3f}")
    parts.append(f"mean response tokens {summary.get('mean_response_tokens', float('nan')):.1f}")
    parts.append(f"{summary.get('problems', 0)} problems, {summary.get('seconds', 0):.0f}s")
    return "  ".join(parts)
