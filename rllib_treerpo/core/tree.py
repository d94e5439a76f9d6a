"""The tree data model (docs/algorithm.md s.1) and the metrics of a batch of trees. Pure: numpy only.

The sampler fills a :class:`Tree` per prompt; rows.py turns trees plus per-node advantages into training rows.
Node 0 is the root (the prompt, no tokens of its own); parents are always added before their children, so
``parent[i] < i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Why a node stopped growing its own tokens.
FINISH_REASONS = ("root", "eos", "delimiter", "length", "env")


@dataclass
class Node:
    """One reasoning step: at most ``step_tokens`` tokens sampled from pi_old given the path to ``parent``."""

    parent: int
    depth: int
    token_ids: np.ndarray  # (n,) int64: this step's own tokens
    logprobs: np.ndarray  # (n,) float32: log pi_old of each sampled token (at the sampling temperature)
    finish_reason: str  # one of FINISH_REASONS
    text: str = ""  # decoded step text (what the env was stepped with)
    terminal: bool = False  # a leaf by construction: EOS, env end marker or depth D
    reward: float = float("nan")  # verifier reward, set on leaves only
    children: list[int] = field(default_factory=list)


@dataclass
class Tree:
    """All sampled steps for one prompt."""

    prompt_ids: np.ndarray  # (p,) int64
    prompt_text: str = ""
    problem_id: str = ""
    answer: str = ""
    nodes: list[Node] = field(default_factory=list)
    # Who grew it, filled by the env runner: {"env_runner": index, "node_id": Ray node id, "node_ip": ip}.
    origin: dict = field(default_factory=dict)
    # The policy version that sampled it: training iterations behind the weights it was grown with (0: the
    # starting weights). The learner trains it only while it is at most max_staleness versions old.
    weights_version: int = 0

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int64)
        if not self.nodes:
            self.nodes.append(
                Node(
                    parent=-1,
                    depth=0,
                    token_ids=np.zeros(0, np.int64),
                    logprobs=np.zeros(0, np.float32),
                    finish_reason="root",
                )
            )

    def add_node(
        self, parent: int, token_ids, logprobs, finish_reason: str, text: str = "", terminal: bool = False
    ) -> int:
        """Append a child of ``parent`` and return its index."""
        if not 0 <= parent < len(self.nodes):
            raise IndexError(f"parent={parent} is not a node of this tree (it has {len(self.nodes)} nodes)")
        if finish_reason not in FINISH_REASONS[1:]:
            raise ValueError(f"finish_reason={finish_reason!r}; expected one of {FINISH_REASONS[1:]}")
        token_ids = np.asarray(token_ids, dtype=np.int64)
        logprobs = np.asarray(logprobs, dtype=np.float32)
        if token_ids.shape != logprobs.shape:
            raise ValueError(f"token_ids {token_ids.shape} and logprobs {logprobs.shape} differ in shape")
        index = len(self.nodes)
        self.nodes.append(
            Node(parent, self.nodes[parent].depth + 1, token_ids, logprobs, finish_reason, text, terminal)
        )
        self.nodes[parent].children.append(index)
        return index

    # --- views used by advantages and metrics -------------------------------------------------
    def parent_array(self) -> np.ndarray:
        """(num_nodes,) int64: ``parent[i]``, -1 for the root: the input of ``tree_advantages``."""
        return np.array([n.parent for n in self.nodes], dtype=np.int64)

    def leaves(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if not n.children and i != 0]

    def leaf_rewards(self) -> np.ndarray:
        """(num_nodes,) float64: the reward at leaves, NaN elsewhere."""
        return np.array([n.reward if not n.children else np.nan for n in self.nodes], dtype=np.float64)

    def path(self, index: int) -> list[int]:
        """Node indices from the root's first child down to ``index`` (empty for the root)."""
        out = []
        while index > 0:
            out.append(index)
            index = self.nodes[index].parent
        return out[::-1]

    def path_ids(self, index: int) -> np.ndarray:
        """Prompt ids followed by the tokens of every step on the path to ``index`` (inclusive)."""
        return np.concatenate([self.prompt_ids] + [self.nodes[i].token_ids for i in self.path(index)])

    def response_text(self, index: int) -> str:
        return "".join(self.nodes[i].text for i in self.path(index))

    @property
    def depth(self) -> int:
        return max(n.depth for n in self.nodes)

    def num_step_tokens(self) -> int:
        """Tokens generated for this tree (every node's own tokens, each counted once)."""
        return int(sum(len(n.token_ids) for n in self.nodes))


def tree_metrics(trees: list[Tree]) -> dict[str, float]:
    """The shape and reward metrics of a batch of trees: training logs them (tree/, reward/, completions/).

    Nodes exclude the roots; generated tokens count every node's own tokens once; a leaf is correct when its
    reward is (numerically) full, i.e. the verifier accepted the answer.
    """
    rewards = np.array([t.nodes[i].reward for t in trees for i in t.leaves()], dtype=np.float64)
    depths = [t.nodes[i].depth for t in trees for i in t.leaves()]
    lengths = [sum(len(t.nodes[n].token_ids) for n in t.path(i)) for t in trees for i in t.leaves()]
    reasons = [n.finish_reason for t in trees for n in t.nodes[1:]]
    out = {
        "tree/trees": float(len(trees)),
        "tree/nodes": float(sum(len(t.nodes) - 1 for t in trees)),
        "tree/leaves": float(len(rewards)),
        "tree/leaf_depth_mean": float(np.mean(depths)) if depths else 0.0,
        "tree/generated_tokens": float(sum(t.num_step_tokens() for t in trees)),
        "tree/prompt_tokens": float(sum(len(t.prompt_ids) for t in trees)),
        "reward/mean": float(rewards.mean()) if len(rewards) else 0.0,
        "reward/std": float(rewards.std()) if len(rewards) else 0.0,  # 0: no learning signal at all
        "reward/accuracy": float(np.mean(rewards >= 1.0 - 1e-9)) if len(rewards) else 0.0,
        "reward/frac_trees_all_wrong": (
            float(np.mean([np.nanmax(t.leaf_rewards()) <= 0 for t in trees])) if trees else 0.0
        ),
        "completions/mean_length": float(np.mean(lengths)) if lengths else 0.0,
    }
    for reason in FINISH_REASONS[1:]:
        out[f"tree/finish_{reason}"] = float(reasons.count(reason))
    return out
