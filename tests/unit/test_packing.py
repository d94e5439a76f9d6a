"""Tree-packed training (packing.py, forward.py): masks and positions, equal log-probs and gradients, the mask
trap, DDP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rllib_treerpo.core.advantages import tree_advantages
from rllib_treerpo.core.losses import LossSettings, compute_loss
from rllib_treerpo.core.tree import Tree
from rllib_treerpo.learner.batches import BatchSettings, collate_minibatch, minibatches
from rllib_treerpo.learner.forward import ForwardSettings, packed_logits, target_stats, tree_attention_mask
from rllib_treerpo.learner.packing import pack_trees
from tests.unit.test_tree import small_tree


def test_rows_layout_context_target_and_alignment():
    """layout="rows": one pack per trained node = the per-row layout of docs/algorithm.md s.4."""
    tree = small_tree()
    _, adv = tree_advantages(tree.parent_array(), tree.leaf_rewards(), tau=0.0, eps=0.0)
    packs = pack_trees([tree], [adv], layout="rows")
    assert [int(p.target_node[0]) for p in packs] == [1, 2, 3, 4]
    # node 4's pack: context = prompt + node 1, targets = its 3 tokens, each predicted by the previous token
    p = packs[3]
    np.testing.assert_array_equal(p.input_ids, [5, 6, 7, 11, 12, 13])
    np.testing.assert_array_equal(p.position_ids, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(p.target_pos, [2, 3, 4])
    np.testing.assert_array_equal(p.target_ids, [11, 12, 13])
    np.testing.assert_allclose(p.old_logprobs, [-0.5, -0.6, -0.7], rtol=1e-6)
    np.testing.assert_allclose(p.advantages, [adv[4]] * 3, rtol=1e-6)
    # every generated token is trained exactly once
    assert sum(p.loss_tokens for p in packs) == tree.num_step_tokens()


def test_packed_layout_shares_the_prefix():
    """layout="packed": the whole tree in one pack, depth-first, each token once."""
    tree = small_tree()
    _, adv = tree_advantages(tree.parent_array(), tree.leaf_rewards(), tau=0.0, eps=0.0)
    (p,) = pack_trees([tree], [adv], layout="packed")
    np.testing.assert_array_equal(p.input_ids, [5, 6, 7, 10, 11, 12, 13, 8, 9])  # DFS: 1, 3, 4, 2
    np.testing.assert_array_equal(p.position_ids, [0, 1, 2, 3, 3, 4, 5, 2, 3])
    # node 4's first token (11) is predicted from node 1's last token (7, index 2); node 2's from the prompt's
    assert dict(zip(p.target_ids.tolist(), p.target_pos.tolist(), strict=True)) == {
        7: 1,
        10: 2,
        11: 2,
        12: 4,
        13: 5,
        8: 1,
        9: 7,
    }


def test_filtered_nodes_train_nothing_and_stay_as_context():
    tree = small_tree()
    adv = np.array([np.nan, np.nan, np.nan, 1.0, -1.0])
    packs = pack_trees([tree, tree], [adv, adv], layout="rows")
    assert [(p.tree, int(p.target_node[0])) for p in packs] == [(0, 3), (0, 4), (1, 3), (1, 4)]
    (packed,) = pack_trees([tree], [adv])
    np.testing.assert_array_equal(
        packed.input_ids, [5, 6, 7, 10, 11, 12, 13]
    )  # node 1 is context, 2 is left out
    assert set(packed.target_node.tolist()) == {3, 4}
    assert pack_trees([tree], [np.full(5, np.nan)]) == []


def test_advantages_of_another_shape_are_refused():
    tree = Tree(prompt_ids=[1])
    with pytest.raises(ValueError, match="advantages shape"):
        pack_trees([tree], [np.zeros(3)])


def random_tree(rng: np.random.Generator, depth: int = 3, vocab: int = 50) -> Tree:
    """Uneven branching (1-3 children), early leaves, empty nodes (no tokens), random rewards."""
    tree = Tree(prompt_ids=rng.integers(3, vocab, size=int(rng.integers(1, 5))))
    frontier = [0]
    for level in range(depth):
        nxt = []
        for parent in frontier:
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(0, 4)) if level < depth - 1 else int(rng.integers(1, 4))
                early = level < depth - 1 and rng.random() < 0.3
                node = tree.add_node(
                    parent,
                    rng.integers(3, vocab, size=k),
                    rng.normal(-3, 0.3, size=k),
                    "length",
                    terminal=early or level == depth - 1,
                )
                if not tree.nodes[node].terminal:
                    nxt.append(node)
        frontier = nxt
    for leaf in tree.leaves():
        tree.nodes[leaf].reward = float(rng.integers(0, 2))
    if len(tree.nodes) == 1 or not tree.leaves():
        return random_tree(rng, depth, vocab)
    return tree


def advantages_with_filtered_groups(tree: Tree, rng) -> np.ndarray:
    """tau 0 advantages, then some whole sibling groups dropped (NaN): their nodes may stay as context
    only."""
    _, adv = tree_advantages(tree.parent_array(), tree.leaf_rewards(), tau=0.0)
    for parent in {n.parent for n in tree.nodes[1:]}:
        if rng.random() < 0.3:
            adv[tree.nodes[parent].children] = np.nan
    return adv


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("layout, budget", [("packed", 10_000), ("packed", 12), ("rows", 0)])
def test_mask_positions_and_predictors_against_a_brute_force_ancestor_check(seed, layout, budget):
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng) for _ in range(3)]
    advantages = [advantages_with_filtered_groups(t, rng) for t in trees]
    packs = pack_trees(trees, advantages, layout=layout, pack_tokens=budget)
    trained = {
        (t, i)
        for t, adv in enumerate(advantages)
        for i in range(1, len(adv))
        if np.isfinite(adv[i]) and len(trees[t].nodes[i].token_ids)
    }
    assert sorted((p.tree, int(n)) for p in packs for n in np.unique(p.target_node)) == sorted(trained)
    batch = {k: torch.as_tensor(v) for k, v in collate_minibatch(packs, "token_mean", 0).items()}
    mask = tree_attention_mask(batch["token_node"], batch["node_parent"])[:, 0].numpy()
    for r, p in enumerate(packs):
        tree = trees[p.tree]
        node = [int(p.node_ids[k]) for k in p.token_node]  # the tree node of each token
        assert all(
            tree.nodes[int(p.node_ids[c])].parent == p.node_ids[q]
            for c, q in enumerate(p.node_parent)
            if q >= 0
        )
        for i in range(len(node)):
            path = {0} | set(tree.path(node[i]))
            allowed = [j <= i and node[j] in path for j in range(len(node))]
            assert mask[r, i, : len(node)].tolist() == allowed
            visible = [p.input_ids[j] for j in range(len(node)) if allowed[j]]
            # what token i sees is exactly its own per-node row: the path up to it, in order
            own = tree.path_ids(node[i])
            assert visible == own[: len(visible)].tolist() and p.position_ids[i] == len(visible) - 1
        for k in range(p.loss_tokens):  # the predictor of loss token k: the token just before it on its path
            n = int(p.target_node[k])
            j = k - int(np.flatnonzero(p.target_node == n)[0])  # index of this token within its node
            context = np.concatenate([tree.path_ids(tree.nodes[n].parent), tree.nodes[n].token_ids[:j]])
            q = int(p.target_pos[k])
            assert [p.input_ids[x] for x in range(q + 1) if mask[r, q, x]] == context.tolist()
            assert p.target_ids[k] == tree.nodes[n].token_ids[j]


def tiny_gqa(seed: int = 0, dtype=torch.float64, arch: str = "qwen2"):
    """A tiny GQA model with a tied head: Qwen2, or Llama (SmolLM2's architecture, whose decoder prepares the
    attention mask differently)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return model_class(config).to(dtype).eval()


def fp64_rmsnorm(self, hidden_states):
    """Qwen2RMSNorm without its float32 cast (made for bf16): in fp64 that cast rounds the gradients that the
    per-row layout sums over many copies of a prefix to float32 precision (~5e-9 here), hiding a real 1e-9
    check."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attention", ["segments", "dense"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_packed_equals_per_row_log_probs_and_gradients_fp64(loss_agg, attention, arch, monkeypatch):
    """fp64, a GQA model of each architecture: the same log-probs and the same gradient of every parameter
    (clipping and KL live). Llama builds its mask with create_causal_mask, which drops a mask it does not
    know: the segment plan must reach the attention another way, or siblings see each other."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", fp64_rmsnorm)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", fp64_rmsnorm)
    rng = np.random.default_rng(3)
    trees = [random_tree(rng) for _ in range(4)]
    advantages = [advantages_with_filtered_groups(t, rng) for t in trees]
    model, ref = tiny_gqa(0, arch=arch), tiny_gqa(1, arch=arch)
    settings = LossSettings(
        clip_eps_low=0.05, clip_eps_high=0.05, kl_coef=0.3, kl_estimator="k3", tis_cap=None
    )
    results = {}
    for layout in ("rows", "packed"):
        packs = pack_trees(trees, advantages, layout=layout)
        batch = {k: torch.as_tensor(v) for k, v in collate_minibatch(packs, loss_agg, 0).items()}
        batch["loss_weight"] = batch["loss_weight"].double()
        model.zero_grad()
        # chunks of 5 positions: the logits are recomputed chunk by chunk in the backward
        forward = ForwardSettings(attention if layout == "packed" else "dense", 0.8, 5, "float32")
        logp, entropy = target_stats(model, batch, forward)
        with torch.no_grad():
            ref_logp, _ = target_stats(ref, batch, ForwardSettings(attention, 0.8, None, "float32"))
        loss, stats = compute_loss(logp, batch, settings, ref_logp, entropy=entropy)
        loss.backward()
        per_token = {
            (
                p.tree,
                int(p.target_node[k]),
                k - int(np.flatnonzero(p.target_node == p.target_node[k])[0]),
            ): float(logp.detach()[r, k])
            for r, p in enumerate(packs)
            for k in range(p.loss_tokens)
        }
        grads = {n: q.grad.clone() for n, q in model.named_parameters()}
        results[layout] = (loss.item(), per_token, grads, stats)
    (loss_r, lp_r, g_r, stats_r), (loss_p, lp_p, g_p, _) = results["rows"], results["packed"]
    assert 0 < stats_r["clip_frac"] < 1 and stats_r["kl"] > 0  # both terms are live
    assert lp_r.keys() == lp_p.keys()
    assert max(abs(lp_r[k] - lp_p[k]) for k in lp_r) < 1e-9
    assert loss_r == pytest.approx(loss_p, abs=1e-9)
    for name in g_r:
        assert torch.allclose(g_r[name], g_p[name], atol=1e-9, rtol=1e-9), name


def test_the_trap_without_the_explicit_mask_log_probs_are_wrong():
    """Why packed_logits always passes the mask: with none, transformers infers 'packed documents' from the
    position ids (they restart at each sibling) and silently builds another mask."""
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, depth=2) for _ in range(3)]
    advantages = [tree_advantages(t.parent_array(), t.leaf_rewards(), tau=0.0)[1] for t in trees]
    packs = [p for p in pack_trees(trees, advantages) if len(np.unique(p.target_node)) > 2]
    batch = {k: torch.as_tensor(v) for k, v in collate_minibatch(packs, "token_mean", 0).items()}
    model = tiny_gqa(0, torch.float32)
    with torch.no_grad():
        right = packed_logits(model, batch, "segments")
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"]
        ).last_hidden_state
        index = batch["target_pos"][..., None].expand(-1, -1, hidden.shape[-1])
        wrong = model.get_output_embeddings()(hidden.gather(1, index))
    valid = batch["loss_weight"] > 0
    assert (right - wrong).abs()[valid].max() > 1e-3


@pytest.mark.ray
def test_two_learners_take_the_same_step_as_one(tiny_lm_dir, ray_session):
    """num_learners=2 on CPU (DDP over gloo): minibatches padded to a multiple of 2 packs, no hang, and the
    same parameters as one local learner after the same minibatches."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from envs import ArithmeticEnv
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig
    from tests.unit.packs_util import hand_packs

    _, _, packs = hand_packs(seed=2, trees=3)  # 3 packs: an odd count, so one shard gets an empty pack
    env = ArithmeticEnv()
    spaces = {DEFAULT_MODULE_ID: (env.observation_space, env.action_space)}
    weights = {}
    for learners in (0, 2):
        # lr 1e-3: Adam turns a rounding-level gradient (k_proj.bias's is 0 in exact arithmetic) into a full
        # lr-sized step of random sign; the two runs must agree far below that.
        values = {
            "model_name_or_path": tiny_lm_dir,
            "lr": 1e-3,
            "num_minibatches": 1,
            "num_learners": learners,
        }
        config = TreeRPOConfig.from_yaml(None, values)
        group = config.build_learner_group(env=None, spaces=spaces)
        try:
            for batch in minibatches(
                packs, BatchSettings.from_config(config), pad_id=0, seed=0, num_learners=max(1, learners)
            ):
                assert len(batch["input_ids"]) % max(1, learners) == 0
                group.update(
                    batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=len(packs))
                )
            state = group.get_state(components="learner/rl_module")["learner"]["rl_module"][DEFAULT_MODULE_ID]
            weights[learners] = {k: torch.as_tensor(v) for k, v in state.items()}
        finally:
            group.shutdown()
    from rllib_treerpo.models.model_io import load_causal_lm, module_state

    initial = module_state(load_causal_lm(tiny_lm_dir).state_dict())
    moved = max(float((weights[0][k] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-4  # the step moved them
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[2][name], atol=1e-6, rtol=1e-5, msg=name)
