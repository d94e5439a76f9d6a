"""The RLlib adapters: TreeRPOConfig (config.py) and TreeRPO (algorithm.py), the env runner that grows trees
(env_runner.py), the learner (learner.py), the causal-LM RLModule (rl_module.py), and the Tune registration
below.

They are thin: sampling, advantages, rows and the loss are the Ray-free core's (rllib_treerpo/*.py); this
layer adds actors, learners, checkpoints and Tune.
"""

from rllib_treerpo.rllib.algorithm import TreeRPO
from rllib_treerpo.rllib.config import TreeRPOConfig

ALGORITHM_NAME = "TreeRPO"

__all__ = ["ALGORITHM_NAME", "TreeRPO", "TreeRPOConfig", "register"]


def register() -> None:
    """Registers TreeRPO with Tune under the name "TreeRPO" (``tune.run("TreeRPO", ...)``, ``tune.Tuner``)."""
    from ray.tune.registry import register_trainable

    register_trainable(ALGORITHM_NAME, TreeRPO)
