"""A real pretrained model on CPU: what tree sampling and evaluation cost and give with it.

With a Hugging Face folder of a real model (``treerpo get-model smollm2-135m-instruct --output DIR``): (a)
  load: seconds and resident memory; (b) sampling throughput with the hf backend: P prompts (reasoning-gym
  basic_arithmetic, chat template), a tree of branching [2, 2, 2] with T-token steps against the same 8 leaves
  per prompt as independent 3T-token responses, EOS off (a step that closes a box still ends its branch):
  decode tokens, tokens fed to the model, seconds, tok/s; (c) held-out accuracy as `treerpo eval` computes it
  (Evaluator: K samples at temperature 1 plus greedy) on basic_arithmetic's test split, with and without the
  chat template; each response is also re-scored with other answer formats (envs/answers.py: boxed, <answer>
  tag, "the answer is"; last_number), to show what the default boxed-only rule misses; (d) peak RSS of the
  process (getrusage) and the machine's load average (other jobs slow a shared machine). Prints a table and
  ends with one JSON line. Columns of (c): "boxed?" / "any?" = share of sampled responses that hold an answer
  in the default format / in one of the explicit formats (boxed, <answer> tag, "the answer is"); "explicit",
  "last number" = pass@1 / greedy accuracy when the env's answer_format is the explicit formats / last_number.

Run: python -m benchmarks.real_model --model DIR [--problems 8] [--samples 2] [--max-new-tokens 64]
     [--step-tokens 16] [--prompts 2] [--threads 1] [--easy] On a machine shared with other jobs, ``--threads
     1`` avoids torch's threads waiting on each other (measured here: 2 threads under a load of 4-5 ran 4-10x
     slower than 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from rllib_treerpo.core.tree import tree_metrics
from rllib_treerpo.generation import make_backend
from rllib_treerpo.learner.precision import hardware_keys
from rllib_treerpo.models.model_io import check_model_config, load_causal_lm, load_tokenizer
from rllib_treerpo.sampling.evaluation import Evaluator
from rllib_treerpo.sampling.prompts import prompt_tokenizer
from rllib_treerpo.sampling.sampler import TreeSpec, grow_trees

TASK = "basic_arithmetic"
# "Calculate 5 - 3.": two one-digit terms, + and - only.
EASY = {
    "max_terms": 2,
    "max_digits": 1,
    "operators": ("+", "-"),
    "allow_negation": False,
    "allow_parentheses": False,
}
EXPLICIT = ["boxed", "answer_tag", "answer_is"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def task_env(task_config: dict | None = None, answer_format=None):
    from envs.reasoning_gym import ReasoningGymEnv

    fmt = answer_format or "boxed"
    return ReasoningGymEnv(
        task=TASK, split="test", test_size=100, size=100, task_config=task_config, answer_format=fmt
    )


def sampling(backend, tokenizer, args) -> dict[str, dict]:
    """(b) tree [2, 2, 2] x T tokens against flat [8] x 3T tokens, same prompts, EOS off."""
    env = task_env(args.task_config)
    roots = []
    for i in range(args.prompts):
        root = env.clone()
        root.reset(options={"problem_index": i})
        roots.append(root)
    chat = prompt_tokenizer(tokenizer, chat_template=True)
    out = {}
    for name, spec in (
        ("tree", TreeSpec((2, 2, 2), args.step_tokens, stop_at_eos=False, seed=0)),
        ("flat", TreeSpec((8,), 3 * args.step_tokens, stop_at_eos=False, seed=0)),
    ):
        backend.clear_cache()
        backend.reset_stats()
        start = time.perf_counter()
        trees = grow_trees([r.clone() for r in roots], backend, chat, spec)
        seconds = time.perf_counter() - start
        out[name] = {
            "leaves": int(tree_metrics(trees)["tree/leaves"]),
            "decode_tokens": backend.stats.decode_tokens,
            "tokens_fed": backend.stats.tokens_fed,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(backend.stats.decode_tokens / seconds, 1),
        }
    return out


def rescore(rows: list[dict], eos_text: str, task_config: dict | None) -> dict[str, float]:
    """Re-score the responses with other answer formats: the three explicit ones together, and last_number."""
    from envs.answers import extract_answer

    explicit, lenient = task_env(task_config, EXPLICIT), task_env(task_config, ["last_number"])
    sampled = {"explicit": 0, "last_number": 0, "answered": 0, "boxed": 0, "n": 0}
    greedy = {"explicit": 0, "last_number": 0}
    for row in rows:
        for env in (explicit, lenient):
            env.reset(options={"problem_index": row["problem_index"]})
        texts = [r.split(eos_text)[0] if eos_text else r for r in row["responses"] + [row["greedy_response"]]]
        for k, text in enumerate(texts):
            counts = greedy if k == len(texts) - 1 else sampled
            counts["explicit"] += explicit._score(text, row["answer"]) >= 1.0
            counts["last_number"] += lenient._score(text, row["answer"]) >= 1.0
            if counts is sampled:
                sampled["answered"] += extract_answer(text, EXPLICIT) is not None
                sampled["boxed"] += extract_answer(text) is not None
                sampled["n"] += 1
    n = sampled["n"]
    return {
        "pass@1_explicit": sampled["explicit"] / n,
        "greedy_explicit": greedy["explicit"] / len(rows),
        "pass@1_last_number": sampled["last_number"] / n,
        "greedy_last_number": greedy["last_number"] / len(rows),
        "answered_boxed": sampled["boxed"] / n,
        "answered_explicit": sampled["answered"] / n,
    }


def accuracy(backend, tokenizer, args, chat_template: bool) -> dict:
    """(c) `treerpo eval` on basic_arithmetic's test split, with or without the chat template."""
    evaluator = Evaluator(
        task_env(args.task_config),
        backend,
        prompt_tokenizer(tokenizer, chat_template=chat_template),
        problems=args.problems,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        seed=0,
    )
    start = time.perf_counter()
    summary, rows = evaluator()
    seconds = time.perf_counter() - start
    return {
        "pass@1": summary["pass@1"],
        f"pass@{args.samples}": summary[f"pass@{args.samples}"],
        "greedy": summary["greedy_accuracy"],
        "mean_response_tokens": round(summary["mean_response_tokens"], 1),
        **{k: round(v, 3) for k, v in rescore(rows, tokenizer.eos_token, args.task_config).items()},
        "seconds": round(seconds, 1),
        "example": rows[0]["greedy_response"][:160],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face folder (treerpo get-model ...)")
    parser.add_argument("--problems", type=int, default=8, help="held-out problems per evaluation")
    parser.add_argument("--samples", type=int, default=2, help="samples per problem (plus one greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="response budget of the evaluation")
    parser.add_argument("--prompts", type=int, default=2, help="prompts of the sampling comparison")
    parser.add_argument("--step-tokens", type=int, default=16, help="tokens per tree step (flat: 3x)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--easy", action="store_true", help=f"easy problems: task_config {EASY}")
    args = parser.parse_args(argv)
    args.task_config = dict(EASY) if args.easy else None
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    check_model_config(args.model)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    load = {"seconds": round(time.perf_counter() - start, 1), "rss_mb": round(peak_rss_mb())}
    params = sum(p.numel() for p in model.parameters())
    backend = make_backend("hf", model, tokenizer)
    result = {
        "model": args.model,
        "parameters": params,
        "threads": torch.get_num_threads(),
        "load": load,
        "sampling": sampling(backend, tokenizer, args),
        "eval_chat_template": accuracy(backend, tokenizer, args, True),
        "eval_plain_prompt": accuracy(backend, tokenizer, args, False),
        "settings": {
            k: getattr(args, k)
            for k in ("problems", "samples", "max_new_tokens", "prompts", "step_tokens", "task_config")
        },
        "peak_rss_mb": round(peak_rss_mb()),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print_table(result, args)
    print(json.dumps({**result, **hardware_keys()}))
    return result


def print_table(r: dict, args) -> None:
    print(
        f"model {r['model']}: {r['parameters'] / 1e6:.1f}M parameters, loaded in {r['load']['seconds']} s, "
        f"RSS {r['load']['rss_mb']} MB; torch threads {r['threads']}; load average {r['loadavg']}"
    )
    print(
        f"(b) sampling, {args.prompts} prompts x 8 leaves of {3 * args.step_tokens} tokens, hf backend, EOS "
        "off"
    )
    print(f"{'':6} {'decode tokens':>14} {'tokens fed':>11} {'seconds':>8} {'tok/s':>7}")
    for name, s in r["sampling"].items():
        print(
            f"{name:6} {s['decode_tokens']:>14} {s['tokens_fed']:>11} {s['seconds']:>8} "
            f"{s['tokens_per_s']:>7}"
        )
    k = args.samples
    print(
        f"(c) {TASK} test split{' (easy)' if args.easy else ''}, {args.problems} problems x {k} samples "
        "(T=1) + "
        f"greedy, max {args.max_new_tokens} new tokens"
    )
    print(
        f"{'prompt':14} {'pass@1':>7} {f'pass@{k}':>7} {'greedy':>7} {'tokens':>7} "
        f"{'boxed?':>7} {'explicit?':>9} {'explicit':>9} {'last number':>11} {'seconds':>8}"
    )
    for name in ("eval_chat_template", "eval_plain_prompt"):
        e = r[name]
        print(
            f"{name.removeprefix('eval_'):14} {e['pass@1']:>7.3f} {e[f'pass@{k}']:>7.3f} {e['greedy']:>7.3f} "
            f"{e['mean_response_tokens']:>7} {e['answered_boxed']:>7.2f} {e['answered_explicit']:>9.2f} "
            f"{e['pass@1_explicit']:>4.2f}/{e['greedy_explicit']:<4.2f} "
            f"{e['pass@1_last_number']:>6.2f}/{e['greedy_last_number']:<4.2f} {e['seconds']:>8}"
        )
        print(f"  greedy example: {e['example']!r}")
    print(f"(d) peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
