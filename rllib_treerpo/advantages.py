"""The public contract's import path: ``from rllib_treerpo.advantages import tree_advantages`` (README,
docs/algorithm.md). The module is :mod:`rllib_treerpo.core.advantages`; this one re-exports its public
names."""

from rllib_treerpo.core.advantages import (
    ADVANTAGE_STD,
    VALUE_ESTIMATES,
    group_counts,
    node_values,
    tree_advantages,
)

__all__ = ["ADVANTAGE_STD", "VALUE_ESTIMATES", "group_counts", "node_values", "tree_advantages"]
