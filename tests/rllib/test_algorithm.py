"""TreeRPO on RLlib: learner step, env runner, build_algo/train/save/restore, remote runner, Tune."""

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from rllib_treerpo.learner.batches import collate_minibatch
from rllib_treerpo.learner.forward import token_logprobs
from rllib_treerpo.rllib.algorithm import TreeRPOConfig
from tests.unit.packs_util import hand_batch, hand_packs, per_node_logprobs

SMALL = {
    "branching": [2, 2],
    "step_tokens": 6,
    "prompts_per_iteration": 2,
    "tau": 0.0,
    "lr": 1e-3,
    "env_config": {"num_ops": 1},
    "seed": 0,
}


def small_config(model_dir, **overrides):
    return TreeRPOConfig.from_yaml(None, {**SMALL, "model_name_or_path": model_dir, **overrides})


def build_learner(config):
    from envs import ArithmeticEnv

    env = ArithmeticEnv()
    spaces = {DEFAULT_MODULE_ID: (env.observation_space, env.action_space)}
    learner = config.build_learner(spaces=spaces)
    return learner


def test_learner_step_equals_the_objective_and_changes_parameters(tiny_lm_dir):
    """The learner's loss on packs equals docs/algorithm.md s.4's objective computed from plain per-node
    forwards."""
    config = small_config(tiny_lm_dir, clip_eps_low=0.1, clip_eps_high=0.3)
    learner = build_learner(config)
    model = learner.module[DEFAULT_MODULE_ID].model
    forest, advantages, packs = hand_packs(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms = []
    with torch.no_grad():
        for tree, adv in zip(forest, advantages, strict=True):
            for node in range(1, len(tree.nodes)):
                if np.isfinite(adv[node]):
                    logp = per_node_logprobs(model, tree, node)
                    ratio = torch.exp(logp - torch.as_tensor(tree.nodes[node].logprobs))
                    a = float(adv[node])
                    terms.append(-torch.minimum(ratio * a, ratio.clamp(0.9, 1.3) * a))
    expected = torch.cat(terms).mean()
    batch = collate_minibatch(packs, "token_mean", pad_id=0)
    result = learner.update(
        batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=len(packs))
    )
    assert result[DEFAULT_MODULE_ID]["loss/total"].peek() == pytest.approx(expected.item(), rel=1e-5)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_logprob_mismatch_is_measured_on_an_iterations_first_update(tiny_lm_dir):
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    learner = build_learner(small_config(tiny_lm_dir))
    batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(hand_batch())}, env_steps=3)
    values = []
    for lifetime in (10, 10, 20):  # the algorithm passes one lifetime count per iteration
        result = learner.update(batch=batch, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime})
        values.append(result[DEFAULT_MODULE_ID]["loss/logprob_mismatch"].peek())
    # the second minibatch (after a step) keeps the first one's value; the next iteration measures again
    assert values[1] == values[0] and values[2] != values[1]


def test_update_moves_probability_towards_positive_advantages(tiny_lm_dir):
    learner = build_learner(small_config(tiny_lm_dir, lr=1e-3))
    model = learner.module[DEFAULT_MODULE_ID].model
    forest, advantages, packs = hand_packs(seed=1)
    batch = collate_minibatch(packs, "token_mean", pad_id=0)
    trained = [(t, n) for t, adv in enumerate(advantages) for n in range(1, len(adv)) if np.isfinite(adv[n])]

    def node_logprob():
        with torch.no_grad():
            return torch.stack([per_node_logprobs(model, forest[t], n).sum() for t, n in trained])

    before = node_logprob()
    for _ in range(3):
        learner.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=len(packs)))
    change = node_logprob() - before
    sign = torch.tensor([np.sign(advantages[t][n]) for t, n in trained])
    assert torch.all(change * sign >= 0) and (change * sign).sum() > 0, (change, sign)


def test_kl_path_builds_reference_and_reports_kl(tiny_lm_dir):
    assert build_learner(small_config(tiny_lm_dir))._ref_models == {}  # kl_coef = 0: no reference model
    learner = build_learner(small_config(tiny_lm_dir, kl_coef=0.5, lr=1e-2))
    assert DEFAULT_MODULE_ID in learner._ref_models
    batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(hand_batch())}, env_steps=4)
    first = learner.update(batch=batch)[DEFAULT_MODULE_ID]["loss/kl"].peek()
    second = learner.update(batch=batch)[DEFAULT_MODULE_ID]["loss/kl"].peek()
    assert first == pytest.approx(0.0, abs=1e-7)  # the policy still equals the reference
    assert second > 1e-6  # after a step it has moved away, and the k3 estimate sees it


def test_env_runner_samples_trees_with_the_weights_it_was_given(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from rllib_treerpo.models.tiny import build_tiny_model
    from rllib_treerpo.rllib.env_runner import TreeEnvRunner

    runner = TreeEnvRunner(config=small_config(tiny_lm_dir, branching=[3, 2]))
    trees = runner.sample(num_prompts=2)
    assert len(trees) == 2
    for tree in trees:
        depth1 = tree.nodes[0].children
        assert len(depth1) == 3
        assert all(len(tree.nodes[c].children) in (0, 2) for c in depth1)
        for leaf in tree.leaves():
            assert 0.0 <= tree.nodes[leaf].reward <= 1.0
            assert len(tree.nodes[leaf].token_ids) <= 6

    other = build_tiny_model(
        99, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=256, seed=123
    )
    runner.set_state(
        {"rl_module": {DEFAULT_MODULE_ID: {f"model.{k}": v for k, v in other.state_dict().items()}}}
    )
    tree = runner.sample(num_prompts=1)[0]
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    fresh.load_state_dict(other.state_dict())
    leaf = tree.leaves()[0]
    ids = torch.as_tensor(tree.path_ids(leaf))[None]
    with torch.no_grad():
        logp = token_logprobs(fresh(input_ids=ids).logits, ids)[0]
    n = sum(len(tree.nodes[i].token_ids) for i in tree.path(leaf))
    recorded = np.concatenate([tree.nodes[i].logprobs for i in tree.path(leaf)])
    np.testing.assert_allclose(logp[-n:].numpy(), recorded, atol=1e-4)


def test_build_train_save_restore_continue(tiny_lm_dir, tmp_path, ray_session):
    config = small_config(tiny_lm_dir)
    algo = config.build_algo()
    result = algo.train()
    assert result["tree/trees"] == 2 and result["tree/nodes"] == 12  # 2 trees x (2 + 4) nodes
    assert "loss/policy_loss" in result["learners"][DEFAULT_MODULE_ID]
    assert result["loss/optimizer_steps"] == min(4, result["tree/train_packs"])  # num_minibatches 4
    algo.save_to_path(str(tmp_path / "ckpt"))
    weights = algo.learner_group.get_state()["learner"]["rl_module"][DEFAULT_MODULE_ID]
    algo.stop()

    restored = small_config(tiny_lm_dir).build_algo()
    restored.restore_from_path(str(tmp_path / "ckpt"))
    assert restored.iteration == 1
    again = restored.learner_group.get_state()["learner"]["rl_module"][DEFAULT_MODULE_ID]
    assert all(torch.equal(torch.as_tensor(weights[k]), torch.as_tensor(again[k])) for k in weights)
    runner_weights = restored.env_runner.get_state(components="rl_module")["rl_module"]
    assert all(torch.equal(torch.as_tensor(weights[k]), runner_weights[k]) for k in weights)
    result = restored.train()
    assert restored.iteration == 2 and result["loss/optimizer_steps"] == min(4, result["tree/train_packs"])
    restored.stop()


def test_remote_env_runner(tiny_lm_dir, ray_session):
    algo = small_config(tiny_lm_dir, num_env_runners=1, prompts_per_iteration=3).build_algo()
    try:
        result = algo.train()
        assert result["tree/trees"] == 3 and result["perf/prompts_lifetime"] == 3
        assert result["learners"][DEFAULT_MODULE_ID]["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    finally:
        algo.stop()


@pytest.mark.ray
def test_two_learners_report_the_synchronized_step_count(tiny_lm_dir, ray_session):
    """num_learners=2: both learners take every planned step together; the count is the plan's, not their
    sum."""
    algo = small_config(tiny_lm_dir, num_learners=2, prompts_per_iteration=3, num_minibatches=2).build_algo()
    try:
        result = algo.train()
        assert result["loss/optimizer_steps"] == min(2, result["tree/train_packs"])
    finally:
        algo.stop()


def test_prompts_are_split_over_runners():
    from rllib_treerpo.rllib.env_runner import TreeEnvRunner

    assert [TreeEnvRunner.prompts_share(7, i, 3) for i in (1, 2, 3)] == [3, 2, 2]
    assert TreeEnvRunner.prompts_share(7, 0, 0) == 7


def test_tune_run_by_name(tiny_lm_dir, tmp_path, ray_session):
    from ray import tune

    import rllib_treerpo  # noqa: F401  registers "TreeRPO"

    config = small_config(tiny_lm_dir)
    analysis = tune.run(
        "TreeRPO",
        config=config.to_dict(),
        stop={"training_iteration": 1},
        storage_path=str(tmp_path),
        verbose=0,
    )
    trial = analysis.trials[0]
    assert trial.status == "TERMINATED"
    assert trial.last_result["training_iteration"] == 1
    assert trial.last_result["tree/trees"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_name_or_path": "no/such/dir"}, "'model_name_or_path' = 'no/such/dir': no such folder"),
        ({"tau": -1}, "'tau' = -1: must be a number >= 0"),
        ({"lr": "abc"}, "'lr' = 'abc': must be a number > 0"),
    ],
)
def test_tune_refuses_a_bad_config_on_the_driver_before_the_trial_starts(
    tiny_lm_dir, tmp_path, ray_session, overrides, message
):
    """Tune validates a trial's config on the driver (TreeRPO.default_resource_request): our one-line
    ValueError comes out of tune.run, not a trial actor's traceback behind 'Trials did not complete'."""
    from ray import tune

    import rllib_treerpo  # noqa: F401  registers "TreeRPO"

    config = {**small_config(tiny_lm_dir).to_dict(), **overrides}
    with pytest.raises(ValueError, match=message):
        tune.run(
            "TreeRPO", config=config, stop={"training_iteration": 1}, storage_path=str(tmp_path), verbose=0
        )


def test_bf16_module_state_round_trips_without_numpy(tiny_lm_dir):
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from envs import ArithmeticEnv
    from rllib_treerpo.rllib.rl_module import CausalLMModule

    env = ArithmeticEnv()
    spec = RLModuleSpec(
        module_class=CausalLMModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config={"model_name_or_path": tiny_lm_dir, "dtype": "bfloat16", "mixed_precision": False},
    )
    a, b = spec.build(), spec.build()
    state = a.get_state()
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.5)
    b.set_state(a.get_state())
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
