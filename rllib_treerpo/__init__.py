"""rllib_treerpo: TreeRPO (Tree Relative Policy Optimization) as a Ray RLlib algorithm.

Layers (docs/architecture.md): the core imports and runs without Ray: ``core/`` (trees, advantages, the
objective), ``sampling/`` (the tree sampler, prompts, evaluation), ``generation/`` (the backends),
``learner/`` (packs, the forward, the update, precision), ``models/`` (model I/O, the embedded tiny model)
and ``config/`` (the settings); the RLlib adapters live in ``rllib_treerpo.rllib``, the `treerpo` jobs in
``rllib_treerpo.jobs``, the PPO baseline in ``rllib_treerpo.baselines.ppo``.

Where Ray is installed, importing the package registers the algorithm with Tune as "TreeRPO", so that
``tune.run("TreeRPO", config=...)`` and ``tune.Tuner("TreeRPO", ...)`` work after ``import rllib_treerpo``;
that imports ray.rllib (a few seconds). ``from rllib_treerpo import TreeRPO, TreeRPOConfig`` gives the
classes.
"""

import importlib.util

__version__ = "0.1.0"
__all__ = ["TreeRPO", "TreeRPOConfig", "__version__"]


def __getattr__(name: str):
    if name in ("TreeRPO", "TreeRPOConfig"):
        from rllib_treerpo import rllib

        return getattr(rllib, name)
    raise AttributeError(f"module 'rllib_treerpo' has no attribute {name!r}")


if importlib.util.find_spec("ray") is not None:
    from rllib_treerpo.rllib import register

    register()
