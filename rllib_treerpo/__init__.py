"""rllib_treerpo: TreeRPO (Tree Relative Policy Optimization) as a Ray RLlib algorithm.

Importing the package registers the algorithm with Tune as "TreeRPO" (when Ray is installed), so that
``tune.run("TreeRPO", config=...)`` and ``tune.Tuner("TreeRPO", ...)`` work. The pure modules (advantages,
losses, tree, sampler, generation) import and run without Ray.
"""

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("ray") is not None:
    from rllib_treerpo.registration import register

    register()
