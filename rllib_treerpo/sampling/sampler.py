"""Grow reasoning trees from environments with a generation backend (docs/algorithm.md s.1). No Ray.

Level by level: every non-terminal node of depth d (the root is depth 0) gets ``branching[d]`` children, and
the whole frontier of all trees is sampled in ONE ``backend.generate`` call whose contexts are the nodes' full
token paths. A backend with prefix caching (``hf``) therefore feeds each node's tokens once.

Each child steps its own clone of its parent's env with its step text: the whole response decoded, minus what
its parent already committed, a trailing unfinished character held back until a later step completes it
(detokenize.py), so a character cut between two steps reaches the env whole. Special tokens are kept, so the
EOS text reaches the env. On every clone ``stop_text`` = the tokenizer's EOS text (None when
``stop_at_eos=False``: EOS then ends nothing); the env's own ``max_steps`` is left as the env was built (an
env that ends earlier than depth D makes earlier leaves). A child is a terminal leaf when the backend stopped
it at EOS, when its env ended (end marker, stop text, step or character limit), or at depth D =
len(branching). A leaf whose env did not end by itself (EOS id whose text is not the stop text, or depth D) is
ended through the env's own API, ``ReasoningEnv.finish()``, which scores it without adding text; leaves carry
the env's reward.

Deterministic for a given ``seed``: level d samples with a seed derived from (seed, d). After the last level
the backend's kept K/V are dropped (leaves are never continued).

``Node.finish_reason``: the backend's reason ("eos", "delimiter", "length"), except "env" when the env
terminated the episode (its end marker) although the backend stopped at a delimiter or the length limit.
A truncation by the env's step limit at depth D keeps the backend's reason ("length"/"delimiter").

GRPO is this function with ``branching=[G]`` and ``step_tokens`` = the whole response budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rllib_treerpo.core.tree import Tree
from rllib_treerpo.generation.base import GenerationBackend, Sample, SamplingParams
from rllib_treerpo.sampling.detokenize import decode_steps

__all__ = ["TreeSpec", "draw_prompts", "grow_trees", "sample_iteration", "sample_trees", "sampling_seed"]


@dataclass(frozen=True)
class TreeSpec:
    """The knobs of tree sampling (docs/algorithm.md s.1). ``branching[d]`` = children per node at depth d."""

    branching: tuple[int, ...]
    step_tokens: int
    step_delimiter: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_at_eos: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "branching", tuple(int(n) for n in self.branching))
        if not self.branching:
            raise ValueError("branching is empty; give one child count per level, e.g. [8, 8, 8]")
        for d, n in enumerate(self.branching):
            if n <= 0:
                raise ValueError(f"branching[{d}]={n}: every level needs at least one child per node")
        if self.step_tokens <= 0:
            raise ValueError(f"step_tokens={self.step_tokens}: a step needs at least one token")
        if self.step_delimiter == "":
            raise ValueError("step_delimiter='' would end every step at once; use None to disable it")

    @property
    def depth(self) -> int:
        return len(self.branching)

    def with_seed(self, seed: int | None) -> TreeSpec:
        return dataclasses.replace(self, seed=seed)

    @property
    def response_tokens(self) -> int:
        """The longest response a tree can hold: depth x step_tokens (also the evaluation's budget)."""
        return self.depth * self.step_tokens

    def params(self, level: int) -> SamplingParams:
        """Sampling params of the generate call for depth ``level`` (0-based); each level its own seed."""
        seed = None
        if self.seed is not None:
            seed = int(np.random.SeedSequence([int(self.seed), level]).generate_state(1)[0])
        return SamplingParams(
            max_new_tokens=self.step_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_at_eos=self.stop_at_eos,
            stop_strings=(self.step_delimiter,) if self.step_delimiter else (),
            seed=seed,
        )


@dataclass
class _Open:
    """A node still to be expanded: tree and node index, its env (state after its own step), its path ids
    (prompt and response), where the response starts, and the response text committed so far
    (detokenize.py)."""

    tree: int
    node: int
    env: Any
    path: list[int]
    start: int
    committed: str = ""


def draw_prompts(env: Any, num_prompts: int, seed: int) -> list[Any]:
    """``num_prompts`` clones of ``env``, each reset on a problem drawn reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    roots = []
    for _ in range(num_prompts):
        root = env.clone()
        root.reset(seed=int(rng.integers(2**31)))
        roots.append(root)
    return roots


def sampling_seed(seed: int | None, worker_index: int, call: int) -> int:
    """The seed of an env runner's ``call``-th sample(), reproducible and distinct per (seed, runner,
    call)."""
    return int(np.random.SeedSequence([seed or 0, worker_index, call]).generate_state(1)[0])


def sample_iteration(
    env: Any, backend: GenerationBackend, tokenizer: Any, spec: TreeSpec, num_prompts: int, seed: int
) -> list[Tree]:
    """``num_prompts`` trees: prompts drawn from ``env`` with ``seed``, grown with ``spec`` seeded by it."""
    return grow_trees(draw_prompts(env, num_prompts, seed), backend, tokenizer, spec.with_seed(seed))


def sample_trees(
    envs: Sequence[Any],
    backend: GenerationBackend,
    tokenizer: Any,
    *,
    branching: Sequence[int],
    step_tokens: int,
    step_delimiter: str | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_at_eos: bool = True,
    seed: int | None = None,
) -> list[Tree]:
    """One tree per env (each already reset on its prompt); see the module docstring for the rules."""
    spec = TreeSpec(
        tuple(branching), step_tokens, step_delimiter, temperature, top_p, top_k, stop_at_eos, seed
    )
    return grow_trees(envs, backend, tokenizer, spec)


def grow_trees(envs: Sequence[Any], backend: GenerationBackend, tokenizer: Any, spec: TreeSpec) -> list[Tree]:
    """:func:`sample_trees` with the knobs in a :class:`TreeSpec`."""
    trees, frontier = _roots(envs, backend, tokenizer, spec)
    stop_text = tokenizer.eos_token if spec.stop_at_eos else None
    for level, n_children in enumerate(spec.branching):
        if not frontier:
            break
        results = backend.generate([f.path for f in frontier], n_children, spec.params(level))
        frontier = _expand(trees, frontier, results, tokenizer, stop_text, level + 1 == spec.depth)
    # Every remaining sample is a leaf and will never be continued: free its K/V for the learner.
    backend.clear_cache()
    return trees


def _roots(
    envs: Sequence[Any], backend: GenerationBackend, tokenizer: Any, spec: TreeSpec
) -> tuple[list[Tree], list[_Open]]:
    """One empty tree per env (its prompt tokenized) and the roots to expand; checks depth and window."""
    trees: list[Tree] = []
    frontier: list[_Open] = []
    for t, env in enumerate(envs):
        # gymnasium wrappers do not forward clone() or the text properties
        env = getattr(env, "unwrapped", env)
        max_steps = getattr(env, "max_steps", None)
        if max_steps is not None and max_steps < spec.depth:
            raise ValueError(
                f"tree depth {spec.depth} (branching {list(spec.branching)}) is deeper than env {t} "
                f"allows: its max_steps = {max_steps}; raise the env's max_steps (env_config) or use "
                "fewer levels"
            )
        prompt_ids = list(tokenizer(env.prompt, add_special_tokens=False)["input_ids"])
        if not prompt_ids:
            raise ValueError(f"env {t} has an empty prompt; reset every env before sampling")
        trees.append(
            Tree(
                prompt_ids=prompt_ids,
                prompt_text=env.prompt,
                problem_id=str(getattr(env, "problem_id", "") or ""),
                answer=str(env.answer),
            )
        )
        frontier.append(_Open(t, 0, env, prompt_ids, len(prompt_ids)))
    window = backend.max_length
    if window is not None:
        need = spec.response_tokens
        for t, tree in enumerate(trees):
            if len(tree.prompt_ids) + need > window:
                raise ValueError(
                    f"tree {t}: prompt of {len(tree.prompt_ids)} tokens + depth {spec.depth} x step_tokens "
                    f"{spec.step_tokens} = {len(tree.prompt_ids) + need} > the model window {window}"
                )
    return trees, frontier


def _expand(
    trees: list[Tree],
    frontier: list[_Open],
    results: list[list[Sample]],
    tokenizer: Any,
    stop_text: str | None,
    last_level: bool,
) -> list[_Open]:
    """Add every sample as a child of its frontier node, step its env, score leaves; the next frontier."""
    pairs = [
        (parent, sample) for parent, samples in zip(frontier, results, strict=True) for sample in samples
    ]
    # Text over the whole path (detokenize.py): a character cut between two steps reaches the env whole.
    texts = iter(
        decode_steps(
            tokenizer,
            [p.path[p.start :] + list(s.token_ids) for p, s in pairs],
            [p.committed for p, _ in pairs],
            [last_level or s.finish_reason == "eos" for _, s in pairs],
        )
    )
    next_frontier: list[_Open] = []
    for parent, samples in zip(frontier, results, strict=True):
        tree = trees[parent.tree]
        for k, sample in enumerate(samples):
            text, committed = next(texts)
            # Each child steps its own copy of the parent's env. Below the root the parent's env belongs to
            # this function and is not needed after its children: the last child takes it (one clone less).
            last = k == len(samples) - 1 and parent.node != 0
            env = parent.env if last else parent.env.clone()
            env.stop_text = stop_text
            _, reward, terminated, truncated, _ = env.step(text)
            ended = terminated or truncated
            terminal = ended or sample.finish_reason == "eos" or last_level
            if terminal and not ended:  # EOS id without the stop text, or depth D: score it as it stands
                _, reward, _, _, _ = env.finish()
            reason = sample.finish_reason
            if terminated and reason in ("delimiter", "length"):
                reason = "env"
            index = tree.add_node(parent.node, sample.token_ids, sample.logprobs, reason, text, terminal)
            if terminal:
                tree.nodes[index].reward = float(reward)
            else:
                path = parent.path + list(sample.token_ids)
                next_frontier.append(_Open(parent.tree, index, env, path, parent.start, committed))
    return next_frontier
