"""The PPO baseline: RLlib's stock PPO on a token-id view of the same reasoning env.

- tokenized_env.py: :class:`TokenizedReasoningEnv`, token-id observation/action spaces around a ReasoningEnv;
- module.py: :class:`PPOCausalLMModule`, the LM over whole reasoning steps plus a value head;
- job.py: the `treerpo train` job for ``algorithm: PPO`` (the shared job loop of jobs/train.py).
"""
