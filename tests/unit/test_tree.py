"""The tree data model: nodes, paths, leaves, rewards, and what a bad node is."""

import numpy as np
import pytest

from rllib_treerpo.core.tree import Tree


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


def test_bad_nodes_and_shapes():
    tree = Tree(prompt_ids=[1])
    with pytest.raises(IndexError, match="parent=3"):
        tree.add_node(3, [1], [0.0], "eos")
    with pytest.raises(ValueError, match="finish_reason"):
        tree.add_node(0, [1], [0.0], "stopped")
    with pytest.raises(ValueError, match="shape"):
        tree.add_node(0, [1, 2], [0.0], "eos")
