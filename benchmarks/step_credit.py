"""How often does outcome-based step credit reward a wrong step? (arithmetic task, line steps)

Samples TreeRPO trees from a model on the arithmetic env, computes advantages exactly as training does, and
checks every arithmetic line ("a+b=c") for correctness. Prints the share of positive-advantage lines that are
wrong and of negative-advantage lines that are right, then one JSON line.

  python -m benchmarks.step_credit --model ~/.cache/rllib_treerpo/warmstart-<hash> [--prompts 32] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from rllib_treerpo.learner.precision import hardware_keys

LINE = re.compile(r"(-?\d+)([+\-*])(-?\d+)=(-?\d+)\n")


def line_is_correct(text: str) -> bool | None:
    """True/False for an arithmetic line, None for anything else (e.g. the \\boxed{} line)."""
    m = LINE.fullmatch(text)
    if not m:
        return None
    a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
    return {"+": a + b, "-": a - b, "*": a * b}[op] == r


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs import ArithmeticEnv
    from rllib_treerpo.core.advantages import tree_advantages
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.sampling.sampler import sample_trees

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--branching", type=int, nargs="+", default=[3, 3, 3, 3])
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    backend = make_backend("hf", model, tok)
    env = ArithmeticEnv(num_ops=3, seed=0)
    rng = np.random.default_rng(args.seed)
    roots = []
    for _ in range(args.prompts):
        e = env.clone()
        e.reset(seed=int(rng.integers(2**31)))
        roots.append(e)
    trees = sample_trees(
        roots, backend, tok, branching=args.branching, step_tokens=12, step_delimiter="\n", seed=args.seed
    )
    counts = {"pos_right": 0, "pos_wrong": 0, "neg_right": 0, "neg_wrong": 0}
    for tree in trees:
        _, adv = tree_advantages(tree.parent_array(), tree.leaf_rewards(), tau=args.tau)
        for i in range(1, len(tree.nodes)):
            ok = line_is_correct(tree.nodes[i].text)
            if ok is None or not np.isfinite(adv[i]) or adv[i] == 0:
                continue
            sign = "pos" if adv[i] > 0 else "neg"
            counts[f"{sign}_{'right' if ok else 'wrong'}"] += 1
    pos = counts["pos_right"] + counts["pos_wrong"]
    neg = counts["neg_right"] + counts["neg_wrong"]
    result = {
        **counts,
        "frac_positive_wrong": counts["pos_wrong"] / max(pos, 1),
        "frac_negative_right": counts["neg_right"] / max(neg, 1),
    }
    print(f"positive-advantage lines: {pos}, wrong {result['frac_positive_wrong']:.1%}")
    print(f"negative-advantage lines: {neg}, right {result['frac_negative_right']:.1%}")
    print(json.dumps({**result, **hardware_keys()}))


if __name__ == "__main__":
    main()
