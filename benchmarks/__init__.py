"""Measured claims: run as modules from the repository root, e.g. ``python -m benchmarks.compare``.

- rollout.py: tree sampling with shared prefixes vs flat sampling (tokens fed, seconds);
- compare.py (+ compare_lib.py): TreeRPO vs GRPO vs RLlib's PPO at equal generated tokens, and ablations;
- learner_replica.py: the Ray-free iteration core driven without RLlib, for many-run questions (GPU machines);
- step_credit.py: how often outcome-based step credit rewards a wrong arithmetic step;
- fault_soak.py: kill -9 of an env runner at a random moment of each run: every iteration keeps all its trees.
"""
