"""Registers TreeRPO with Tune under the name "TreeRPO"."""

ALGORITHM_NAME = "TreeRPO"


def register() -> None:
    from ray.tune.registry import register_trainable

    from rllib_treerpo.algorithm import TreeRPO

    register_trainable(ALGORITHM_NAME, TreeRPO)
