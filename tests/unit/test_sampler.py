"""Tree sampling (docs/algorithm.md s.1): shapes, stops, rewards, determinism, validation, and shared-prefix
cost."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rllib_treerpo.core.tree import tree_metrics
from rllib_treerpo.generation import make_backend
from rllib_treerpo.models.tiny import build_char_tokenizer
from rllib_treerpo.sampling.sampler import TreeSpec, sample_trees
from tests.unit.test_generation import fresh_logprobs, tiny_lm, token_id


class FakeEnv:
    """The ReasoningEnv contract in a few lines, without gymnasium: end marker "##", reward = answer in
    text."""

    end_marker = "##"

    def __init__(self, prompt: str, answer: str = "7", max_steps: int = 8) -> None:
        self._prompt, self._answer, self._response = prompt, answer, ""
        self.stop_text: str | None = None
        self.max_steps, self.steps, self.done = max_steps, 0, False
        self.problem_id = f"fake-{prompt}"

    def reset(self, seed=None, options=None):
        self._response, self.steps, self.done = "", 0, False
        return self._prompt, {"problem_id": self.problem_id, "answer": self._answer}

    def step(self, step_text: str):
        assert not self.done, "stepped after the end"
        self.steps += 1
        terminated = False
        if self.stop_text and self.stop_text in step_text:
            step_text, terminated = step_text[: step_text.index(self.stop_text)], True
        terminated = terminated or self.end_marker in step_text
        self._response += step_text
        truncated = not terminated and self.steps >= self.max_steps
        self.done = terminated or truncated
        reward = float(self._answer in self._response) if self.done else 0.0
        return self._prompt + self._response, reward, terminated, truncated, {"problem_id": self.problem_id}

    def finish(self):
        assert not self.done, "finished after the end"
        self.done = True
        reward = float(self._answer in self._response)
        return self._prompt + self._response, reward, True, False, {"problem_id": self.problem_id}

    def clone(self):
        return copy.copy(self)

    prompt = property(lambda self: self._prompt)
    answer = property(lambda self: self._answer)
    response = property(lambda self: self._response)


PROMPTS = ["3+4=", "12*7-1=", "Q: 9-2 "]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def envs(prompts=PROMPTS):
    out = [FakeEnv(p) for p in prompts]
    for env in out:
        env.reset()
    return out


def check_structure(tree, depth: int) -> None:
    """Parents before children, depth = parent depth + 1, non-terminal nodes below D have children."""
    for i, node in enumerate(tree.nodes[1:], start=1):
        assert node.parent < i and node.depth == tree.nodes[node.parent].depth + 1
        assert node.depth <= depth
        assert bool(node.children) != node.terminal  # leaves are exactly the terminal nodes
        assert math.isfinite(node.reward) == node.terminal
        assert len(node.token_ids) == len(node.logprobs) >= 1


def test_full_tree_shape_rewards_and_logprobs(tok):
    model = tiny_lm(tok)
    backend = make_backend("hf", model, tok)
    es = envs()
    trees = sample_trees(
        es, backend, tok, branching=[3, 2], step_tokens=4, stop_at_eos=False, temperature=1.3, seed=0
    )
    assert len(trees) == 3
    for tree, env in zip(trees, es, strict=True):
        check_structure(tree, 2)
        assert len(tree.nodes) == 1 + 3 + 6
        assert [n.depth for n in tree.nodes].count(2) == 6 and len(tree.leaves()) == 6
        assert tree.prompt_text == env.prompt and tree.answer == "7" and tree.problem_id == env.problem_id
        assert env.response == "" and env.steps == 0  # the caller's env is never stepped, only clones
        for i in tree.leaves():
            leaf = tree.nodes[i]
            assert leaf.finish_reason == "length" and len(leaf.token_ids) == 4
            assert leaf.reward == float("7" in tree.response_text(i))
            # pi_old log-probs of every step on the path equal a fresh forward at the sampling temperature
            seq = tree.path_ids(i).tolist()
            lps = np.concatenate([tree.nodes[j].logprobs for j in tree.path(i)])
            assert lps == pytest.approx(fresh_logprobs(model, seq, len(tree.prompt_ids), 1.3), abs=1e-4)
            assert tree.nodes[i].text == tok.decode(tree.nodes[i].token_ids)


def test_prefix_is_fed_once(tok):
    """The model is fed the prompts and every node's tokens once; a leaf's last token never."""
    backend = make_backend("hf", tiny_lm(tok), tok)
    trees = sample_trees(envs(), backend, tok, branching=[2, 3, 2], step_tokens=3, seed=1)
    nodes = [n for t in trees for n in t.nodes[1:]]
    inner = sum(1 for n in nodes if n.children)
    expected = sum(len(t.prompt_ids) for t in trees) + sum(len(n.token_ids) - 1 for n in nodes) + inner
    assert backend.stats.tokens_fed == expected
    assert backend.stats.decode_tokens == sum(t.num_step_tokens() for t in trees)
    assert backend.stats.generate_calls == 3  # one call per level for all trees


def test_early_eos_makes_leaves(tok):
    eos = tok.eos_token_id
    trees = sample_trees(
        envs(),
        make_backend("hf", tiny_lm(tok, bias={"</s>": 3.5}), tok),
        tok,
        branching=[3, 3, 3],
        step_tokens=5,
        seed=0,
    )
    early = [n for t in trees for n in t.nodes[1:] if n.finish_reason == "eos" and n.depth < 3]
    assert early
    for tree in trees:
        check_structure(tree, 3)
    for n in early:
        assert n.terminal and not n.children and n.token_ids[-1] == eos and eos not in n.token_ids[:-1]
        assert n.text.endswith(tok.eos_token)
    # Nodes that did not stop at EOS and sit above depth D carry on.
    assert all(n.children for t in trees for n in t.nodes[1:] if n.depth < 3 and not n.terminal)


def test_eos_id_unknown_to_env_still_scores_the_leaf(tok):
    """A backend EOS id whose text is not the env's stop text: the sampler ends the episode itself."""
    tilde = token_id(tok, "~")
    backend = make_backend("hf", tiny_lm(tok, bias={"~": 3.5}), tok, eos_token_ids=[tok.eos_token_id, tilde])
    trees = sample_trees(envs(), backend, tok, branching=[3, 2], step_tokens=5, seed=0)
    ended = [n for t in trees for n in t.nodes[1:] if n.token_ids[-1] == tilde]
    assert ended and all(n.terminal and n.finish_reason == "eos" and math.isfinite(n.reward) for n in ended)


def test_delimiter_steps(tok):
    nl = token_id(tok, "\n")
    trees = sample_trees(
        envs(),
        make_backend("hf", tiny_lm(tok, bias={"\n": 3.0}), tok),
        tok,
        branching=[2, 2, 2],
        step_tokens=8,
        step_delimiter="\n",
        stop_at_eos=False,
        seed=0,
    )
    nodes = [n for t in trees for n in t.nodes[1:]]
    delim = [n for n in nodes if n.finish_reason == "delimiter"]
    assert delim and any(n.children for n in delim)  # a delimiter ends the step, not the response
    for n in nodes:
        assert (n.finish_reason == "delimiter") == (n.token_ids[-1] == nl)
        assert nl not in n.token_ids[:-1]
        assert n.finish_reason == "delimiter" or len(n.token_ids) == 8
    for tree in trees:
        check_structure(tree, 3)
        assert len(tree.nodes) == 1 + 2 + 4 + 8  # no EOS, no end marker (biased away from neither)


def test_env_end_marker_ends_branch(tok):
    trees = sample_trees(
        envs(),
        make_backend("hf", tiny_lm(tok, bias={"#": 3.0}), tok),
        tok,
        branching=[3, 3],
        step_tokens=6,
        stop_at_eos=False,
        seed=0,
    )
    by_env = [n for t in trees for n in t.nodes[1:] if n.finish_reason == "env"]
    assert by_env and any(n.depth == 1 for n in by_env)
    for n in by_env:
        assert n.terminal and not n.children and "##" in n.text and math.isfinite(n.reward)
    for tree in trees:
        check_structure(tree, 2)


def test_truncated_leaves_at_depth_d(tok):
    """Depth-D nodes are leaves ended through the env's finish() (the env's own max_steps is left alone)."""
    es = [FakeEnv(p, max_steps=8) for p in PROMPTS]
    for e in es:
        e.reset()
    trees = sample_trees(
        es,
        make_backend("hf", tiny_lm(tok), tok),
        tok,
        branching=[2, 2],
        step_tokens=3,
        stop_at_eos=False,
        seed=0,
    )
    for tree in trees:
        assert len(tree.nodes) == 7
        assert all(tree.nodes[i].depth == 2 and math.isfinite(tree.nodes[i].reward) for i in tree.leaves())
        assert all(tree.nodes[i].finish_reason == "length" for i in tree.leaves())
    assert all(e.max_steps == 8 for e in es)


def test_a_tree_deeper_than_the_env_allows_is_an_error(tok):
    es = [FakeEnv(p, max_steps=1) for p in PROMPTS]
    for e in es:
        e.reset()
    with pytest.raises(ValueError, match=r"depth 2 .* max_steps = 1"):
        sample_trees(es, make_backend("hf", tiny_lm(tok), tok), tok, branching=[2, 2], step_tokens=3)


def test_grpo_is_depth_one(tok):
    trees = sample_trees(
        envs(), make_backend("hf", tiny_lm(tok), tok), tok, branching=[5], step_tokens=12, seed=0
    )
    for tree in trees:
        assert len(tree.nodes) == 6 and tree.leaves() == [1, 2, 3, 4, 5]
        assert all(tree.nodes[i].depth == 1 and tree.nodes[i].terminal for i in tree.leaves())


def test_seed_determinism(tok):
    model = tiny_lm(tok, bias={"</s>": 2.0})

    def run(seed):
        trees = sample_trees(
            envs(), make_backend("hf", model, tok), tok, branching=[2, 2, 2], step_tokens=4, seed=seed
        )
        return [(n.parent, n.token_ids.tolist(), n.finish_reason) for t in trees for n in t.nodes], trees

    a, trees_a = run(3)
    b, trees_b = run(3)
    assert a == b
    for ta, tb in zip(trees_a, trees_b, strict=True):
        for na, nb in zip(ta.nodes, tb.nodes, strict=True):
            np.testing.assert_allclose(na.logprobs, nb.logprobs, atol=1e-6)
    assert run(4)[0] != a


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"branching": []}, "branching is empty"),
        ({"branching": [2, 0]}, r"branching\[1\]=0"),
        ({"branching": [-1]}, r"branching\[0\]=-1"),
        ({"step_tokens": 0}, "step_tokens=0"),
        ({"step_tokens": -3}, "step_tokens=-3"),
    ],
)
def test_bad_knobs_name_the_value(tok, knobs, message):
    args = {"branching": [2], "step_tokens": 4, **knobs}
    with pytest.raises(ValueError, match=message):
        sample_trees(envs(), make_backend("hf", tiny_lm(tok), tok), tok, **args)
    with pytest.raises(ValueError, match=message):
        TreeSpec(tuple(args["branching"]), args["step_tokens"])


def test_tree_longer_than_window(tok):
    es = envs(["x" * 100])
    with pytest.raises(
        ValueError, match=r"100 tokens \+ depth 2 x step_tokens 16 = 132 > the model window 128"
    ):
        sample_trees(es, make_backend("hf", tiny_lm(tok), tok), tok, branching=[2, 2], step_tokens=16)


def test_tree_metrics(tok):
    trees = sample_trees(
        envs(),
        make_backend("hf", tiny_lm(tok), tok),
        tok,
        branching=[2, 2],
        step_tokens=3,
        stop_at_eos=False,
        seed=0,
    )
    stats = tree_metrics(trees)
    assert stats["tree/nodes"] == 18 and stats["tree/leaves"] == 12 and stats["tree/generated_tokens"] == 54
    assert stats["tree/finish_length"] == 18 and 0.0 <= stats["reward/mean"] <= 1.0


def test_with_arithmetic_env(tok):
    arithmetic = pytest.importorskip("envs.arithmetic")
    es = [arithmetic.ArithmeticEnv(seed=0) for _ in range(4)]
    for i, env in enumerate(es):
        env.reset(options={"problem_index": i})
    torch.manual_seed(0)
    trees = sample_trees(
        es,
        make_backend("hf", tiny_lm(tok), tok),
        tok,
        branching=[2, 2, 2],
        step_tokens=8,
        step_delimiter="\n",
        seed=0,
    )
    for tree, env in zip(trees, es, strict=True):
        check_structure(tree, 3)
        assert tree.answer == env.answer and tree.problem_id == str(env.problem_id)
        assert all(tree.nodes[i].reward in (0.0, 1.0) for i in tree.leaves())
