"""Held-out evaluation, one evaluator for every caller: pass@1 (mean over K samples), pass@K, greedy accuracy
and mean response length.

Ray-free. It reuses the tree sampler with a depth-1 tree (``branching=[K]``, one step as long as a whole
response), so evaluation generates exactly as training does, through the same backend. :class:`Evaluator`
fixes the env and the settings once; each call evaluates the backend's current weights (or the weights it is
given, loaded through ``GenerationBackend.load_weights``). `treerpo train`, `treerpo eval` and the benchmarks
all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rllib_treerpo.generation import GenerationBackend
from rllib_treerpo.sampling.sampler import TreeSpec, grow_trees


@dataclass
class Evaluator:
    """Evaluate on problems start_problem..problems-1 of ``env`` (``reset(options={"problem_index": i})``).

    ``tokenizer`` formats and tokenizes prompts (a PromptTokenizer for chat templates); ``max_new_tokens`` is
    the response budget (a training config's ``TreeSpec.response_tokens``). Problems are generated in
    batches of ``batch_problems`` seeded by ``seed`` + the batch's first index: a batch is the unit of work
    (:func:`problem_batches`), so evaluating the batches on several runners gives what one evaluator gives.
    """

    env: Any
    backend: GenerationBackend
    tokenizer: Any
    problems: int
    samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    greedy: bool = True
    seed: int = 0
    batch_problems: int = 50
    start_problem: int = 0  # the first problem: a multiple of batch_problems, so batches (and seeds) align

    @classmethod
    def from_model(
        cls,
        model_name_or_path: str,
        env: Any,
        *,
        dtype: str = "float32",
        backend: str = "hf",
        chat_template: bool = False,
        system_prompt: str | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Evaluator:
        """An evaluator with its own backend on the model at ``model_name_or_path`` (Hugging Face folder);
        ``backend_kwargs`` go to the backend's ``from_pretrained`` (e.g. TreeRPOConfig.backend_kwargs())."""
        from rllib_treerpo.generation import get_backend_class
        from rllib_treerpo.models.model_io import load_tokenizer
        from rllib_treerpo.sampling.prompts import prompt_tokenizer

        tokenizer = load_tokenizer(model_name_or_path)
        gen = get_backend_class(backend).from_pretrained(
            model_name_or_path, tokenizer, dtype=dtype, **(backend_kwargs or {})
        )
        return cls(
            env,
            gen,
            prompt_tokenizer(tokenizer, chat_template=chat_template, system_prompt=system_prompt),
            **settings,
        )

    def __call__(
        self, weights: Mapping[str, Any] | None = None, progress: Callable[[int, int], None] | None = None
    ) -> tuple[dict[str, float], list[dict]]:
        """The summary and one row per problem (prompt, answer, sampled responses, rewards, greedy response).

        ``weights`` (Hugging Face names), when given, are loaded into the backend first.
        """
        if weights is not None:
            self.backend.load_weights(weights)
        sampled_spec = TreeSpec((self.samples,), self.max_new_tokens, temperature=self.temperature)
        greedy_spec = TreeSpec((1,), self.max_new_tokens, temperature=0.0, seed=0)
        if self.start_problem % self.batch_problems:
            raise ValueError(
                f"start_problem {self.start_problem}: not a multiple of batch_problems {self.batch_problems}"
            )
        rows: list[dict] = []
        for start in range(self.start_problem, self.problems, self.batch_problems):
            idx = range(start, min(self.problems, start + self.batch_problems))
            roots = []
            for i in idx:
                root = self.env.clone()
                root.reset(options={"problem_index": i})
                roots.append(root)
            sampled = grow_trees(
                roots, self.backend, self.tokenizer, sampled_spec.with_seed(self.seed + start)
            )
            greedy = (
                grow_trees(roots, self.backend, self.tokenizer, greedy_spec)
                if self.greedy
                else [None] * len(roots)
            )
            rows += [
                _problem_row(i, tree, gtree) for i, tree, gtree in zip(idx, sampled, greedy, strict=True)
            ]
            self.backend.clear_cache()
            if progress is not None:
                progress(len(rows), self.problems - self.start_problem)
        return summarize(rows), rows


def problem_batches(problems: int, batch_problems: int = 50) -> list[tuple[int, int]]:
    """``(start, stop)`` of each batch an :class:`Evaluator` on ``problems`` problems generates."""
    return [(s, min(problems, s + batch_problems)) for s in range(0, problems, batch_problems)]


def _problem_row(index: int, tree, greedy_tree) -> dict:
    leaves = tree.leaves()
    row = {
        "problem_index": index,
        "prompt": tree.prompt_text,
        "answer": tree.answer,
        "responses": [tree.response_text(j) for j in leaves],
        "rewards": [float(tree.nodes[j].reward) for j in leaves],
        "response_tokens": [int(len(tree.nodes[j].token_ids)) for j in leaves],
    }
    if greedy_tree is not None:
        g = greedy_tree.leaves()[0]
        row["greedy_response"] = greedy_tree.response_text(g)
        row["greedy_reward"] = float(greedy_tree.nodes[g].reward)
    return row


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
