"""The tree data model and its flattening into training rows."""

import numpy as np
import pytest

from rllib_treerpo.advantages import tree_advantages
from rllib_treerpo.rows import flatten_trees
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


def test_flatten_rows_context_target_and_alignment():
    tree = small_tree()
    _, adv = tree_advantages(tree.parent_array(), tree.leaf_rewards(), tau=0.0, eps=0.0)
    rows = flatten_trees([tree], [adv], pad_id=0)
    assert list(rows["node_index"]) == [1, 2, 3, 4]
    # node 4's row: context = prompt + node 1, target = its 3 tokens
    r = 3
    np.testing.assert_array_equal(rows["input_ids"][r], [5, 6, 7, 11, 12, 13])
    np.testing.assert_array_equal(rows["loss_mask"][r], [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(rows["old_logprobs"][r], [0, 0, 0, -0.5, -0.6, -0.7], rtol=1e-6)
    np.testing.assert_allclose(rows["advantages"][r], [0, 0, 0] + [adv[4]] * 3, rtol=1e-6)
    # node 1's row is right-padded
    np.testing.assert_array_equal(rows["input_ids"][0], [5, 6, 7, 0, 0, 0])
    np.testing.assert_array_equal(rows["attention_mask"][0], [1, 1, 1, 0, 0, 0])
    # every generated token is trained exactly once
    assert rows["loss_mask"].sum() == tree.num_step_tokens()


def test_flatten_skips_filtered_nodes():
    tree = small_tree()
    adv = np.array([np.nan, np.nan, np.nan, 1.0, -1.0])
    rows = flatten_trees([tree, tree], [adv, adv])
    assert list(rows["tree_index"]) == [0, 0, 1, 1] and list(rows["node_index"]) == [3, 4, 3, 4]
    empty = flatten_trees([tree], [np.full(5, np.nan)])
    assert empty["input_ids"].shape == (0, 0)


def test_bad_nodes_and_shapes():
    tree = Tree(prompt_ids=[1])
    with pytest.raises(IndexError, match="parent=3"):
        tree.add_node(3, [1], [0.0], "eos")
    with pytest.raises(ValueError, match="finish_reason"):
        tree.add_node(0, [1], [0.0], "stopped")
    with pytest.raises(ValueError, match="shape"):
        tree.add_node(0, [1, 2], [0.0], "eos")
    with pytest.raises(ValueError, match="advantages shape"):
        flatten_trees([tree], [np.zeros(3)])
