"""The jobs behind the `treerpo` command: train (jobs/train.py), eval (jobs/eval.py), sweep (jobs/sweep.py),
the config loader (jobs/config.py) and the learning-curve plot (jobs/plots.py)."""
