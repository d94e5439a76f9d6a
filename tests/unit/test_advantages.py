"""Hand-worked trees for tree_advantages (docs/algorithm.md s.2, s.3) and a readable reference loop."""

import math

import numpy as np
import pytest

from rllib_treerpo.core.advantages import group_counts, node_values, tree_advantages

NAN = float("nan")
S = 1 / math.sqrt(2)  # 0.7071...

# Tree A: branching [2, 2].  0 -> {1, 2}; 1 -> {3, 4}; 2 -> {5, 6}.  Leaf rewards 1, 0 | 0, 0.
A_PARENT = [-1, 0, 0, 1, 1, 2, 2]
A_REWARD = [NAN, NAN, NAN, 1, 0, 0, 0]
# Tree B: early leaf.  0 -> {1 (leaf, r=1), 2}; 2 -> {3, 4, 5} with rewards 0, 0, 1.
B_PARENT = [-1, 0, 0, 2, 2, 2]
B_REWARD = [NAN, 1, NAN, 0, 0, 1]


def test_values_child_mean_tree_a():
    # V1 = mean(1, 0) = .5, V2 = 0, V0 = mean(.5, 0) = .25
    np.testing.assert_allclose(node_values(A_PARENT, A_REWARD), [0.25, 0.5, 0.0, 1, 0, 0, 0])


def test_values_child_mean_vs_leaf_mean_tree_b():
    # child_mean: V2 = 1/3, V0 = mean(1, 1/3) = 2/3.  leaf_mean: V0 = mean(1, 0, 0, 1) = 1/2.
    np.testing.assert_allclose(node_values(B_PARENT, B_REWARD), [2 / 3, 1, 1 / 3, 0, 0, 1])
    np.testing.assert_allclose(
        node_values(B_PARENT, B_REWARD, value_estimate="leaf_mean"), [0.5, 1, 1 / 3, 0, 0, 1]
    )


def test_group_std_tree_a():
    # group {1,2}: values .5, 0 -> centred +-.25, std(ddof=1) = .3536 -> A = +-S
    # group {3,4}: 1, 0 -> +-.5 / .7071 = +-S;  group {5,6}: all 0 -> std 0 < tau -> dropped
    values, adv = tree_advantages(A_PARENT, A_REWARD, eps=0.0)
    np.testing.assert_allclose(values, [0.25, 0.5, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(adv, [NAN, S, -S, S, -S, NAN, NAN])


def test_tree_std_tree_a():
    # centred values of kept groups: .25, -.25, .5, -.5 -> std(ddof=1) = sqrt(.625 / 3) = .456435
    _, adv = tree_advantages(A_PARENT, A_REWARD, advantage_std="tree", eps=0.0)
    s = math.sqrt(0.625 / 3)
    np.testing.assert_allclose(adv, [NAN, 0.25 / s, -0.25 / s, 0.5 / s, -0.5 / s, NAN, NAN])


def test_no_std_tree_a():
    _, adv = tree_advantages(A_PARENT, A_REWARD, advantage_std="none")
    np.testing.assert_allclose(adv, [NAN, 0.25, -0.25, 0.5, -0.5, NAN, NAN])


def test_group_std_tree_b_and_tau_filter():
    # group {1,2}: 1, 1/3 -> +-1/3, std .4714 -> +-S.  group {3,4,5}: 0,0,1 mean 1/3, std sqrt(1/3)
    _, adv = tree_advantages(B_PARENT, B_REWARD, eps=0.0)
    r3 = math.sqrt(1 / 3)
    np.testing.assert_allclose(adv, [NAN, S, -S, -1 / 3 / r3, -1 / 3 / r3, 2 / 3 / r3])
    # tau = .5 drops the first group (std .4714) and keeps the second (std .577)
    _, adv = tree_advantages(B_PARENT, B_REWARD, tau=0.5, eps=0.0)
    np.testing.assert_allclose(adv, [NAN, NAN, NAN, -1 / 3 / r3, -1 / 3 / r3, 2 / 3 / r3])
    # leaf_mean changes V0 only, which is in no group: same advantages
    _, adv_lm = tree_advantages(B_PARENT, B_REWARD, value_estimate="leaf_mean", tau=0.5, eps=0.0)
    np.testing.assert_allclose(adv_lm, adv)


def test_leaf_mean_changes_group_values():
    # 0 -> {1, 2}; 1 -> {3 (leaf r=1), 4}; 4 -> {5, 6} r = 0, 0; 2 -> {7, 8} r = 1, 0
    parent = [-1, 0, 0, 1, 1, 4, 4, 2, 2]
    reward = [NAN, NAN, NAN, 1, NAN, 0, 0, 1, 0]
    # child_mean: V4 = 0, V1 = .5, V2 = .5 -> group {1,2} has std 0 -> dropped
    v, adv = tree_advantages(parent, reward, tau=0.01, eps=0.0)
    assert v[1] == 0.5 and np.isnan(adv[1]) and np.isnan(adv[2])
    # leaf_mean: V1 = mean(1, 0, 0) = 1/3, V2 = .5 -> kept
    v, adv = tree_advantages(parent, reward, tau=0.01, value_estimate="leaf_mean", eps=0.0)
    assert v[1] == pytest.approx(1 / 3)
    assert adv[1] == pytest.approx(-S) and adv[2] == pytest.approx(S)


def test_single_node_group_is_dropped():
    _, adv = tree_advantages([-1, 0, 1, 1], [NAN, NAN, 1.0, 0.0], tau=0.0)
    assert np.isnan(adv[1])  # only child of the root
    assert adv[2] > 0 > adv[3]


@pytest.mark.parametrize("seed", range(5))
def test_depth_one_tree_is_grpo(seed):
    rng = np.random.default_rng(seed)
    g = 16
    rewards = rng.integers(0, 2, g).astype(float) * rng.random(g)
    parent = [-1] + [0] * g
    _, adv = tree_advantages(parent, np.concatenate([[NAN], rewards]), tau=0.0)
    expected = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(adv[1:], expected, rtol=1e-12)


def test_grpo_all_equal_rewards_gives_zero():
    _, adv = tree_advantages([-1, 0, 0, 0], [NAN, 1, 1, 1], tau=0.0)
    np.testing.assert_array_equal(adv[1:], [0.0, 0.0, 0.0])
    _, adv = tree_advantages([-1, 0, 0, 0], [NAN, 1, 1, 1], tau=0.1)
    assert np.all(np.isnan(adv))


def reference(parent, reward, advantage_std, tau, value_estimate, eps):
    """Readable loop: the definition in docs/algorithm.md, one node at a time."""
    n = len(parent)
    children = {i: [j for j in range(n) if parent[j] == i] for i in range(n)}

    def leaves_below(i):
        return [i] if not children[i] else [x for c in children[i] for x in leaves_below(c)]

    def value(i):
        if not children[i]:
            return reward[i]
        if value_estimate == "child_mean":
            return sum(value(c) for c in children[i]) / len(children[i])
        return sum(reward[x] for x in leaves_below(i)) / len(leaves_below(i))

    values = [value(i) for i in range(n)]
    adv = [NAN] * n
    centred = {}
    group_std = {}
    for p in range(n):
        group = children[p]
        if len(group) < 2:
            continue
        mean = sum(values[c] for c in group) / len(group)
        std = math.sqrt(sum((values[c] - mean) ** 2 for c in group) / (len(group) - 1))
        if std < tau:
            continue
        for c in group:
            centred[c] = values[c] - mean
            group_std[c] = std
    if centred:
        all_c = list(centred.values())
        tree_std = math.sqrt(sum(x * x for x in all_c) / max(len(all_c) - 1, 1))
    for c, x in centred.items():
        scale = {"group": group_std[c] + eps, "tree": tree_std + eps, "none": 1.0}[advantage_std]
        adv[c] = x / scale
    return values, adv


def random_tree(rng):
    parent = [-1]
    frontier = [0]
    for _ in range(rng.integers(1, 4)):
        new = []
        for p in frontier:
            for _ in range(rng.integers(1, 5)):
                parent.append(p)
                if rng.random() < 0.7:
                    new.append(len(parent) - 1)
        frontier = new
    reward = rng.integers(0, 2, len(parent)).astype(float)
    return parent, reward


@pytest.mark.parametrize("advantage_std", ["group", "tree", "none"])
@pytest.mark.parametrize("value_estimate", ["child_mean", "leaf_mean"])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5])
def test_matches_reference_loop(advantage_std, value_estimate, tau):
    rng = np.random.default_rng(hash((advantage_std, value_estimate, tau)) % 2**32)
    for _ in range(30):
        parent, reward = random_tree(rng)
        kw = dict(advantage_std=advantage_std, tau=tau, value_estimate=value_estimate, eps=1e-6)
        values, adv = tree_advantages(parent, reward, **kw)
        ref_values, ref_adv = reference(parent, reward, **kw)
        np.testing.assert_allclose(values, ref_values, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-9, atol=1e-12)


def test_group_counts_count_filtered_groups():
    _, adv = tree_advantages(A_PARENT, A_REWARD)
    stats = group_counts(A_PARENT, adv)
    assert stats == {"groups": 3.0, "groups_kept": 2.0, "frac_groups_filtered": pytest.approx(1 / 3)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(parent=[0, 0], leaf_reward=[0, 1]), "parent\\[0\\]"),
        (dict(parent=[-1, 2, 0], leaf_reward=[0, 1, 1]), "parent\\[1\\]"),
        (dict(parent=[-1, 0], leaf_reward=[0, NAN]), "leaf_reward\\[1\\]"),
        (dict(parent=[-1, 0], leaf_reward=[0]), "shape"),
        (dict(parent=[-1, 0], leaf_reward=[0, 1], advantage_std="batch"), "advantage_std"),
        (dict(parent=[-1, 0], leaf_reward=[0, 1], value_estimate="max"), "value_estimate"),
        (dict(parent=[-1, 0], leaf_reward=[0, 1], tau=-1), "tau"),
    ],
)
def test_bad_input_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tree_advantages(**kwargs)


def test_the_public_contract_keeps_its_import_path():
    """``rllib_treerpo.advantages.tree_advantages`` (README, docs/algorithm.md) is the core's function."""
    import rllib_treerpo.advantages as public
    from rllib_treerpo.core import advantages as core

    assert public.tree_advantages is core.tree_advantages and public.node_values is core.node_values
