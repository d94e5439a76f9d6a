"""Held-out evaluation: pass@1 (mean over K samples), pass@K, greedy accuracy, mean response length.

Ray-free. It reuses the tree sampler with a depth-1 tree (``branching=[K]``, one step as long as a whole
response), so evaluation generates exactly as training does, through the same backend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rllib_treerpo.generation import GenerationBackend
from rllib_treerpo.sampler import sample_trees


def evaluate(
    env,
    backend: GenerationBackend,
    tokenizer,
    *,
    num_problems: int,
    samples: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    greedy: bool = True,
    seed: int = 0,
    batch_problems: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Evaluate on problems 0..num_problems-1 of ``env`` (``reset(options={"problem_index": i})``).

    Returns the summary and one row per problem: prompt, answer, sampled responses and rewards, greedy
    response and reward.
    """
    rows: list[dict] = []
    for start in range(0, num_problems, batch_problems):
        idx = range(start, min(num_problems, start + batch_problems))
        roots = []
        for i in idx:
            e = env.clone()
            e.reset(options={"problem_index": i})
            roots.append(e)
        common = dict(branching=[samples], step_tokens=max_new_tokens, step_delimiter=None, stop_at_eos=True)
        sampled = sample_trees(roots, backend, tokenizer, temperature=temperature, seed=seed + start, **common)
        greedy_trees = (sample_trees(roots, backend, tokenizer, temperature=0.0, seed=0,
                                     **{**common, "branching": [1]}) if greedy else [None] * len(roots))
        for i, tree, gtree in zip(idx, sampled, greedy_trees, strict=True):
            leaves = tree.leaves()
            row = {
                "problem_index": i,
                "prompt": tree.prompt_text,
                "answer": tree.answer,
                "responses": [tree.response_text(j) for j in leaves],
                "rewards": [float(tree.nodes[j].reward) for j in leaves],
                "response_tokens": [int(len(tree.nodes[j].token_ids)) for j in leaves],
            }
            if gtree is not None:
                g = gtree.leaves()[0]
                row["greedy_response"] = gtree.response_text(g)
                row["greedy_reward"] = float(gtree.nodes[g].reward)
            rows.append(row)
        backend.clear_cache()
        if progress is not None:
            progress(len(rows), num_problems)
    return summarize(rows), rows


def summarize(rows: list[dict]) -> dict[str, float]:
    """Aggregate per-problem rows; a reward counts as correct when it is (numerically) 1."""
    if not rows:
        return {"problems": 0}
    correct = [np.asarray(r["rewards"]) >= 1.0 - 1e-9 for r in rows]
    out = {
        "problems": len(rows),
        "samples": len(rows[0]["rewards"]),
        "pass@1": float(np.mean([c.mean() for c in correct])),
        f"pass@{len(rows[0]['rewards'])}": float(np.mean([c.any() for c in correct])),
        "mean_reward": float(np.mean([np.mean(r["rewards"]) for r in rows])),
        "mean_response_tokens": float(np.mean([np.mean(r["response_tokens"]) for r in rows])),
    }
    if "greedy_reward" in rows[0]:
        out["greedy_accuracy"] = float(np.mean([r["greedy_reward"] >= 1.0 - 1e-9 for r in rows]))
    return out
