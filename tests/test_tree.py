"""The tree data model and its layout into training packs (per node and tree-packed)."""

import numpy as np
import pytest

from rllib_treerpo.advantages import tree_advantages
from rllib_treerpo.packing import pack_trees
from rllib_treerpo.tree import Tree


def small_tree():
    # prompt [5, 6]; 0 -> {1: [7], 2: [8, 9]}; 1 -> {3: [10], 4: [11, 12, 13]}
    tree = Tree(prompt_ids=[5, 6], prompt_text="ab", answer="1")
    tree.add_node(0, [7], [-0.1], "delimiter", "x")
    tree.add_node(0, [8, 9], [-0.2, -0.3], "eos", "yz", terminal=True)
    tree.add_node(1, [10], [-0.4], "eos", "w", terminal=True)
    tree.add_node(1, [11, 12, 13], [-0.5, -0.6, -0.7], "length", "uvt", terminal=True)
    for i, r in ((2, 0.0), (3, 1.0), (4, 0.0)):
        tree.nodes[i].reward = r
    return tree


def test_structure_views():
    tree = small_tree()
    np.testing.assert_array_equal(tree.parent_array(), [-1, 0, 0, 1, 1])
    assert tree.leaves() == [2, 3, 4]
    assert tree.depth == 2 and tree.nodes[4].depth == 2
    np.testing.assert_array_equal(tree.path_ids(4), [5, 6, 7, 11, 12, 13])
    np.testing.assert_array_equal(tree.path_ids(0), [5, 6])
    assert tree.response_text(3) == "xw"
    assert tree.num_step_tokens() == 7
    rewards = tree.leaf_rewards()
    assert np.isnan(rewards[:2]).all() and list(rewards[2:]) == [0.0, 1.0, 0.0]


def test_rows_layout_context_target_and_alignment():
    """layout="rows": one pack per trained node = the per-row layout of SPEC.md s.4."""
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


def test_bad_nodes_and_shapes():
    tree = Tree(prompt_ids=[1])
    with pytest.raises(IndexError, match="parent=3"):
        tree.add_node(3, [1], [0.0], "eos")
    with pytest.raises(ValueError, match="finish_reason"):
        tree.add_node(0, [1], [0.0], "stopped")
    with pytest.raises(ValueError, match="shape"):
        tree.add_node(0, [1, 2], [0.0], "eos")
    with pytest.raises(ValueError, match="advantages shape"):
        pack_trees([tree], [np.zeros(3)])
