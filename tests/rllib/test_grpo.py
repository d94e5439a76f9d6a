"""GRPO is TreeRPO with a depth-1 tree (docs/algorithm.md s.3): same code path, GRPO's advantages exactly."""

from pathlib import Path

import numpy as np
import pytest

from rllib_treerpo.core.tree import Tree
from rllib_treerpo.learner.rows import PackSettings, build_training_batch

G = 8
EPS = 1e-6


def pack_settings(tau: float, layout: str = "packed") -> PackSettings:
    return PackSettings(
        tau=tau,
        advantage_std="group",
        value_estimate="child_mean",
        advantage_eps=EPS,
        layout=layout,
        pack_tokens=8192,
    )


def grpo_advantages(rewards: np.ndarray, eps: float = EPS) -> np.ndarray:
    """GRPO as TRL/verl write it: (r - mean) / (std + eps) with the sample std (ddof = 1)."""
    return (rewards - rewards.mean()) / (rewards.std(ddof=1) + eps)


def depth1_tree(rng, rewards, prompt_len=5) -> Tree:
    tree = Tree(prompt_ids=rng.integers(3, 90, prompt_len))
    for r in rewards:
        n = int(rng.integers(1, 12))
        child = tree.add_node(0, rng.integers(3, 90, n), rng.normal(size=n) - 3.0, "eos", terminal=True)
        tree.nodes[child].reward = float(r)
    return tree


def by_node(packs) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """(tree, node) -> the node's loss tokens in the packs: their advantages, old log-probs and ids."""
    out: dict[tuple[int, int], dict[str, list]] = {}
    for p in packs:
        for k, node in enumerate(p.target_node.tolist()):
            entry = out.setdefault((p.tree, node), {"advantages": [], "old_logprobs": [], "ids": []})
            entry["advantages"].append(p.advantages[k])
            entry["old_logprobs"].append(p.old_logprobs[k])
            entry["ids"].append(p.target_ids[k])
    return {key: {k: np.asarray(v) for k, v in entry.items()} for key, entry in out.items()}


@pytest.mark.parametrize("layout", ["packed", "rows"])
@pytest.mark.parametrize("kind", ["binary", "continuous"])
def test_depth1_batch_has_exactly_grpo_advantages(kind, layout):
    rng = np.random.default_rng(0)
    groups = [rng.integers(0, 2, G).astype(float) if kind == "binary" else rng.random(G) for _ in range(6)]
    groups.append(np.ones(G))  # all right: GRPO's advantages are all 0
    groups.append(np.zeros(G))  # all wrong: likewise
    trees = [depth1_tree(rng, r) for r in groups]
    packs, metrics = build_training_batch(trees, pack_settings(0.0, layout))
    nodes = by_node(packs)
    for (t, node), entry in nodes.items():
        expected = grpo_advantages(groups[t])[node - 1]
        np.testing.assert_allclose(entry["advantages"], expected, rtol=1e-6, atol=1e-6)
        # the whole response is trained after the prompt, with the sampling log-probs
        np.testing.assert_array_equal(entry["ids"], trees[t].nodes[node].token_ids)
        np.testing.assert_allclose(entry["old_logprobs"], trees[t].nodes[node].logprobs)
    assert set(nodes) == {
        (t, i) for t in range(len(groups)) for i in range(1, G + 1)
    }  # tau = 0 keeps them all
    assert all(
        p.input_ids[: len(trees[p.tree].prompt_ids)].tolist() == trees[p.tree].prompt_ids.tolist()
        for p in packs
    )
    assert metrics["tree/groups"] == len(groups) and metrics["tree/frac_groups_filtered"] == 0.0

    # tau > 0 drops exactly the constant groups (where GRPO's advantage is 0 anyway); the rest is unchanged
    kept, metrics = build_training_batch(trees, pack_settings(0.1, layout))
    varied = [t for t, r in enumerate(groups) if np.std(r, ddof=1) >= 0.1]
    assert sorted({p.tree for p in kept}) == varied
    assert metrics["tree/frac_groups_filtered"] == pytest.approx(1 - len(varied) / len(groups))
    assert by_node(kept).keys() == {key for key in nodes if key[0] in varied}
    for key, entry in by_node(kept).items():
        np.testing.assert_allclose(entry["advantages"], nodes[key]["advantages"], rtol=1e-6)


def test_sampled_depth1_trees_are_grpo_groups(tiny_lm_dir):
    """The real sampler with branching [G] and one step as long as a response gives G whole responses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs import ArithmeticEnv
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.sampling.sampler import sample_trees

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    backend = make_backend("hf", AutoModelForCausalLM.from_pretrained(tiny_lm_dir), tokenizer)
    envs = []
    for i in range(3):
        env = ArithmeticEnv(num_ops=1)
        env.reset(options={"problem_index": i})
        envs.append(env)
    trees = sample_trees(envs, backend, tokenizer, branching=[G], step_tokens=16, seed=0)
    rng = np.random.default_rng(1)
    for tree in trees:
        assert len(tree.nodes) == G + 1 and all(n.terminal for n in tree.nodes[1:])
        for leaf in tree.leaves():  # a random model scores 0 everywhere: give the group varied rewards
            tree.nodes[leaf].reward = float(rng.integers(0, 2))
    packs, _ = build_training_batch(trees, pack_settings(0.0))
    for (t, node), entry in by_node(packs).items():
        rewards = np.array([trees[t].nodes[i].reward for i in trees[t].leaves()])
        np.testing.assert_allclose(entry["advantages"], grpo_advantages(rewards)[node - 1], rtol=1e-6)


def test_grpo_config_is_a_depth1_tree_with_whole_response_steps():
    from rllib_treerpo.jobs.config import load_run_config

    root = Path(__file__).resolve().parents[2] / "configs"
    grpo, grpo_job, _ = load_run_config(root / "tiny_arith_grpo.yaml")
    tree, tree_job, _ = load_run_config(root / "tiny_arith.yaml")
    assert grpo.branching == [16] and grpo.step_delimiter is None
    assert grpo.tree_spec().response_tokens == tree.tree_spec().response_tokens  # the same response budget
    assert grpo.prompts_per_iteration == tree.prompts_per_iteration == 32
    assert all(getattr(grpo, k) == getattr(tree, k) for k in ("env", "env_config", "lr", "temperature"))
    assert all(
        getattr(grpo_job, k) == getattr(tree_job, k)
        for k in ("tiny_model", "warmstart", "iterations", "eval_problems")
    )
