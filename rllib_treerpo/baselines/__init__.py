"""Baselines that run on the same envs, models and job as TreeRPO (GRPO needs none: it is TreeRPO with a
depth-1 tree, configs/tiny_arith_grpo.yaml)."""
