"""TreeEnvRunner: the only place that grows trees (ARCHITECTURE.md).

It owns a reasoning env (cloned per prompt and per branch), the policy (a CausalLMModule whose weights arrive
from the learners through set_state) and a generation backend over that same model. ``sample(num_prompts)``
returns a list of :class:`rllib_treerpo.tree.Tree`. As Ray actors (num_env_runners >= 1) several runners sample
in parallel; with num_env_runners = 0 the local runner samples.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import gymnasium as gym
import numpy as np
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, WEIGHTS_SEQ_NO

STATE_COUNTERS = "tree_runner_counters"


def make_reasoning_env(env, env_config: dict | None):
    """A ReasoningEnv from a registered id (``"treerpo/Arithmetic-v0"``) or a ReasoningEnv subclass."""
    import envs  # noqa: F401  registers the treerpo/* ids
    from envs.base import ReasoningEnv

    env_config = dict(env_config or {})
    if isinstance(env, str):
        try:
            instance = gym.make(env, **env_config).unwrapped
        except gym.error.Error as e:
            raise ValueError(f"config field 'env' = {env!r}: {e}") from e
    elif isinstance(env, type):
        instance = env(**env_config)
    else:
        raise ValueError(f"config field 'env' = {env!r}: expected a gymnasium id or a ReasoningEnv subclass")
    if not isinstance(instance, ReasoningEnv):
        raise ValueError(f"config field 'env' = {env!r} is a {type(instance).__name__}, not a ReasoningEnv: "
                         "TreeRPO grows trees by cloning text environments")
    return instance


class TreeEnvRunner(EnvRunner, Checkpointable):
    """Samples TreeRPO trees with a generation backend."""

    @override(EnvRunner)
    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self.worker_index = kwargs.get("worker_index") or 0
        self._num_calls = 0
        self._weights_seq_no = 0
        self.make_env()
        self.make_module()

    @override(EnvRunner)
    def make_env(self) -> None:
        self.env = make_reasoning_env(self.config.env, self.config.env_config)

    @override(EnvRunner)
    def make_module(self) -> None:
        from transformers import AutoTokenizer

        from rllib_treerpo.generation import make_backend
        from rllib_treerpo.prompts import prompt_tokenizer

        spec = self.config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True)
        if not isinstance(spec, RLModuleSpec):  # a MultiRLModuleSpec: TreeRPO trains one policy
            spec = spec.rl_module_specs[DEFAULT_MODULE_ID]
        self.module = spec.build()
        self.module.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_name_or_path)
        # Prompts may be wrapped in the chat template (instruct models); the backend keeps the plain tokenizer.
        self.prompt_tokenizer = prompt_tokenizer(self.tokenizer, chat_template=self.config.chat_template,
                                                 system_prompt=self.config.system_prompt)
        self.backend = make_backend(self.config.backend, self.module.model, self.tokenizer)

    @override(EnvRunner)
    def get_spaces(self):
        spaces = (self.env.observation_space, self.env.action_space)
        return {"__env__": spaces, "__env_single__": spaces, DEFAULT_MODULE_ID: spaces}

    def _call_seed(self) -> int:
        """A distinct, reproducible seed per (config.seed, runner, call)."""
        base = self.config.seed if self.config.seed is not None else 0
        return int(np.random.SeedSequence([base, self.worker_index, self._num_calls]).generate_state(1)[0])

    @override(EnvRunner)
    def sample(self, *, num_prompts: int | None = None, **kwargs):
        """Grow one tree per prompt; ``num_prompts`` defaults to this runner's share of the iteration."""
        from rllib_treerpo.sampler import sample_trees

        c = self.config
        if num_prompts is None:
            num_prompts = self.prompts_share(c.prompts_per_iteration, self.worker_index, c.num_env_runners)
        seed = self._call_seed()
        self._num_calls += 1
        rng = np.random.default_rng(seed)
        roots = []
        for _ in range(num_prompts):
            env = self.env.clone()
            env.reset(seed=int(rng.integers(2**31)))
            roots.append(env)
        self.backend.reset_stats()
        start = time.perf_counter()
        trees = sample_trees(
            roots, self.backend, self.prompt_tokenizer, branching=list(c.branching), step_tokens=c.step_tokens,
            step_delimiter=c.step_delimiter, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
            stop_at_eos=c.stop_at_eos, seed=seed,
        )
        seconds = time.perf_counter() - start
        decode = self.backend.stats.decode_tokens
        self.metrics.log_value("perf/sample_seconds", seconds, reduce="sum")
        self.metrics.log_value("perf/decode_tokens", decode, reduce="sum")
        self.metrics.log_value("perf/model_tokens", self.backend.stats.tokens_fed, reduce="sum")
        nodes = sum(len(t.nodes) - 1 for t in trees)
        self.num_env_steps_sampled_lifetime += nodes
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, nodes, reduce="lifetime_sum")
        return trees

    @staticmethod
    def prompts_share(total: int, worker_index: int, num_runners: int) -> int:
        """Runner i's part of ``total`` prompts (remote runners are 1-based; the local runner alone gets all)."""
        if num_runners <= 0 or worker_index == 0:
            return total
        base, extra = divmod(total, num_runners)
        return base + (1 if worker_index <= extra else 0)

    @override(EnvRunner)
    def get_metrics(self):
        return self.metrics.reduce()

    @override(EnvRunner)
    def assert_healthy(self):
        assert self.env is not None and hasattr(self, "module") and hasattr(self, "backend")

    @override(EnvRunner)
    def stop(self) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()

    # --- Checkpointable: weights, weight version and the sampling counter ------------------
    @override(Checkpointable)
    def get_state(self, components: str | Collection[str] | None = None, *,
                  not_components: str | Collection[str] | None = None, **kwargs):
        state = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime,
                 STATE_COUNTERS: {"num_calls": self._num_calls}}
        if self._check_component(COMPONENT_RL_MODULE, components, not_components):
            state[COMPONENT_RL_MODULE] = self.module.get_state()
            state[WEIGHTS_SEQ_NO] = self._weights_seq_no
        return state

    @override(Checkpointable)
    def set_state(self, state) -> None:
        import ray

        if COMPONENT_RL_MODULE in state:
            seq_no = state.get(WEIGHTS_SEQ_NO, 0)
            if seq_no == 0 or self._weights_seq_no < seq_no:
                module_state = state[COMPONENT_RL_MODULE]
                if isinstance(module_state, ray.ObjectRef):
                    module_state = ray.get(module_state)
                if isinstance(module_state, dict) and DEFAULT_MODULE_ID in module_state:
                    module_state = module_state[DEFAULT_MODULE_ID]
                self.module.set_state(module_state)  # the backend generates with this same model
                self.backend.clear_cache()  # cached prefixes were computed with the old weights
            if seq_no > 0:
                self._weights_seq_no = seq_no
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]
        if STATE_COUNTERS in state:
            self._num_calls = state[STATE_COUNTERS]["num_calls"]

    @override(Checkpointable)
    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config, "worker_index": self.worker_index}

    @override(Checkpointable)
    def get_checkpointable_components(self):
        return [(COMPONENT_RL_MODULE, self.module)]
