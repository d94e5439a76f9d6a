"""No model given: TreeRPO builds (and caches) the embedded default, as RLlib users expect of tune.run("PPO",
...)."""

from __future__ import annotations


def test_build_algo_without_a_model_uses_the_embedded_default(embedded_default, ray_session):
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig

    algo = TreeRPOConfig().training(prompts_per_iteration=2, branching=[2, 2]).build_algo()
    try:
        assert algo.config.model_name_or_path == embedded_default
        assert algo.train()["tree/trees"] == 2
    finally:
        algo.stop()


def test_tune_run_and_tuner_with_a_plain_dict(embedded_default, ray_session, tmp_path):
    """As an RLlib user tries it: tune.run("TreeRPO", config={...}) with no model, like tune.run("PPO",
    ...)."""
    from ray import tune

    import rllib_treerpo  # noqa: F401  registers "TreeRPO"

    small = {"prompts_per_iteration": 2, "branching": [2, 2]}  # the default env: the cached embedded model
    analysis = tune.run(
        "TreeRPO", config=small, stop={"training_iteration": 1}, storage_path=str(tmp_path), verbose=0
    )
    assert analysis.trials[0].last_result["tree/trees"] == 2
    tuner = tune.Tuner(
        "TreeRPO",
        param_space=small,
        run_config=tune.RunConfig(stop={"training_iteration": 1}, storage_path=str(tmp_path), verbose=0),
    )
    assert tuner.fit()[0].metrics["tree/trees"] == 2
