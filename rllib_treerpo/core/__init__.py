"""The pure math of TreeRPO: trees, values and advantages, the objective (numpy and torch only)."""
