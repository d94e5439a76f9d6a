"""rllib_treerpo: TreeRPO (Tree Relative Policy Optimization) as a Ray RLlib algorithm."""

__version__ = "0.1.0"
