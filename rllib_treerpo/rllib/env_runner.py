"""TreeEnvRunner: the only place that grows trees.

It owns a reasoning env (cloned per prompt and per branch) and a generation backend that loads the policy
itself (``GenerationBackend.from_pretrained``); new weights from the learners reach the backend only through
``GenerationBackend.load_weights``, so any backend (hf, vllm) plugs in. ``sample(num_prompts)`` returns a list
of :class:`rllib_treerpo.core.tree.Tree` grown by the Ray-free
:func:`rllib_treerpo.sampling.sampler.sample_iteration`. As Ray actors (num_env_runners >= 1) several runners
sample in parallel; with num_env_runners = 0 the local runner samples.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, WEIGHTS_SEQ_NO

from rllib_treerpo.learner.precision import resolve_config_dtype
from rllib_treerpo.models.model_io import hf_weights, module_state
from rllib_treerpo.rllib.model_files import local_model_folder

STATE_COUNTERS = "tree_runner_counters"
# The policy version of the weights a runner holds (training iterations behind them), sent with every weight
# sync beside RLlib's WEIGHTS_SEQ_NO (which counts optimizer updates): each tree it grows carries it.
WEIGHTS_VERSION = "treerpo_weights_version"


class TreeEnvRunner(EnvRunner, Checkpointable):
    """Samples TreeRPO trees with a generation backend."""

    @override(EnvRunner)
    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self.worker_index = kwargs.get("worker_index") or 0
        self.env = None
        self.backend = None
        self._num_calls = 0
        self._weights_seq_no = 0
        self._weights_dropped = False
        self._weights_version = 0  # the model folder's weights: the learners' starting point
        self._last_sample_end: float | None = None
        self.last_wait_seconds = 0.0  # idle before the last sample(): waiting for work or weights
        self._held_out: tuple[str, object] | None = None  # (env_config key, the held-out env) for evaluation
        self.make_env()
        self.make_module()

    @override(EnvRunner)
    def make_env(self) -> None:
        from envs import make_reasoning_env

        self.env = make_reasoning_env(self.config.env, self.config.env_config)

    @override(EnvRunner)
    def make_module(self) -> None:
        """The backend plays the RLModule's part here: it holds the policy's weights and samples with them."""
        from rllib_treerpo.generation import get_backend_class
        from rllib_treerpo.models.model_io import load_tokenizer
        from rllib_treerpo.sampling.prompts import prompt_tokenizer

        c = self.config
        self.module = None  # RLlib's module API is not used: trees are grown by the backend
        # On a cluster the folder may exist on the driver's node only: then this node's copy of it.
        self.model_folder = local_model_folder(c.model_name_or_path, who=f"env runner {self.worker_index}")
        self.tokenizer = load_tokenizer(self.model_folder)
        # Prompts may be wrapped in the chat template (instruct models); the backend keeps the plain
        # tokenizer.
        self.prompt_tokenizer = prompt_tokenizer(
            self.tokenizer, chat_template=c.chat_template, system_prompt=c.system_prompt
        )
        self.backend = get_backend_class(c.backend).from_pretrained(
            self.model_folder, self.tokenizer, dtype=resolve_config_dtype(c, None), **c.backend_kwargs()
        )
        self.spec = c.tree_spec()

    @override(EnvRunner)
    def get_spaces(self):
        spaces = (self.env.observation_space, self.env.action_space)
        return {"__env__": spaces, "__env_single__": spaces, DEFAULT_MODULE_ID: spaces}

    @override(EnvRunner)
    def sample(self, *, num_prompts: int | None = None, seed: int | None = None, **kwargs):
        """Grow one tree per prompt; ``num_prompts`` defaults to this runner's share of the iteration.

        TreeRPO.training_step passes each share's ``seed`` (rllib/shares.py: it depends on the iteration and
        the share, not on the runner); without one, the seed follows this runner's index and its count of
        calls."""
        from rllib_treerpo.sampling.sampler import sample_iteration, sampling_seed

        started = time.perf_counter()
        if self._last_sample_end is not None:
            self.last_wait_seconds = started - self._last_sample_end
        c = self.config
        if num_prompts is None:
            num_prompts = self.prompts_share(c.prompts_per_iteration, self.worker_index, c.num_env_runners)
        if seed is None:
            seed = sampling_seed(c.seed, self.worker_index, self._num_calls)
        self._num_calls += 1
        self.backend.reset_stats()
        trees = sample_iteration(self.env, self.backend, self.prompt_tokenizer, self.spec, num_prompts, seed)
        origin = self.origin()
        for tree in trees:
            tree.origin = dict(origin)
            tree.weights_version = self._weights_version
        stats = self.backend.stats
        self.metrics.log_value("perf/decode_tokens", stats.decode_tokens, reduce="sum")
        self.metrics.log_value("perf/model_tokens", stats.tokens_fed, reduce="sum")
        nodes = sum(len(t.nodes) - 1 for t in trees)
        self.num_env_steps_sampled_lifetime += nodes
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, nodes, reduce="lifetime_sum")
        if c.release_after_sampling:  # e.g. a sleeping vLLM engine leaves the GPU to a learner on it
            self.backend.release()
        self._last_sample_end = time.perf_counter()
        return trees

    def evaluate_problems(self, settings: dict, start: int, stop: int) -> list[dict]:
        """Held-out problems ``start..stop-1`` (one Evaluator batch) with this runner's current weights: the
        per-problem rows (rllib/evaluation.py; ``settings`` from its evaluation_settings). The held-out env
        is built once per env_config; this runner's training env and sampling counters are untouched."""
        from envs import make_reasoning_env
        from rllib_treerpo.sampling.evaluation import Evaluator

        key = repr(sorted(settings["env_config"].items()))
        if self._held_out is None or self._held_out[0] != key:
            env = make_reasoning_env(self.config.env, settings["env_config"], field="evaluation_config")
            self._held_out = (key, env)
        env = self._held_out[1]
        limit = getattr(env, "num_problems", None)
        stop = min(stop, limit) if isinstance(limit, int) else stop
        if start >= stop:
            return []
        evaluator = Evaluator(
            env,
            self.backend,
            self.prompt_tokenizer,
            problems=stop,
            start_problem=start,
            samples=settings["samples"],
            max_new_tokens=settings["max_new_tokens"],
            temperature=settings["temperature"],
            seed=settings["seed"],
        )
        _, rows = evaluator()
        if self.config.release_after_sampling:
            self.backend.release()
        return rows

    def set_weights_version(self, version: int) -> None:
        """The version of the weights this runner holds (after RLlib's restore, which sends none)."""
        self._weights_version = int(version)

    def drop_weights(self) -> bool:
        """Free the sampler's weights until the next weight sync (when the learner updates in this process:
        TreeRPO.training_step); whether the backend freed anything."""
        self._weights_dropped = self.backend.drop_weights()
        return self._weights_dropped

    def origin(self) -> dict:
        """Which env runner on which Ray node grows trees here (each tree records it)."""
        import ray

        out = {"env_runner": self.worker_index}
        if ray.is_initialized():
            out["node_id"] = ray.get_runtime_context().get_node_id()
            out["node_ip"] = ray.util.get_node_ip_address()
        return out

    @staticmethod
    def prompts_share(total: int, worker_index: int, num_runners: int) -> int:
        """Runner i's part of ``total`` prompts (remote runners are 1-based; a lone local runner: all)."""
        if num_runners <= 0 or worker_index == 0:
            return total
        base, extra = divmod(total, num_runners)
        return base + (1 if worker_index <= extra else 0)

    @override(EnvRunner)
    def get_metrics(self):
        return self.metrics.reduce()

    @override(EnvRunner)
    def assert_healthy(self):
        assert self.env is not None and self.backend is not None

    @override(EnvRunner)
    def stop(self) -> None:
        if self.env is not None:
            self.env.close()
        if self.backend is not None:
            self.backend.release()

    # --- Checkpointable: weights, weight version and the sampling counter ------------------
    @override(Checkpointable)
    def get_state(
        self,
        components: str | Collection[str] | None = None,
        *,
        not_components: str | Collection[str] | None = None,
        **kwargs,
    ):
        state = {
            NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime,
            STATE_COUNTERS: {"num_calls": self._num_calls},
        }
        if self._check_component(COMPONENT_RL_MODULE, components, not_components):
            try:
                state[COMPONENT_RL_MODULE] = module_state(self.backend.weights())
            except NotImplementedError:  # vllm: the weights live in the engine; the learner holds the same
                pass
            state[WEIGHTS_SEQ_NO] = self._weights_seq_no
            state[WEIGHTS_VERSION] = self._weights_version
        return state

    @override(Checkpointable)
    def set_state(self, state) -> None:
        import ray

        if COMPONENT_RL_MODULE in state:
            seq_no = state.get(WEIGHTS_SEQ_NO, 0)
            if seq_no == 0 or self._weights_seq_no < seq_no or self._weights_dropped:
                weights = state[COMPONENT_RL_MODULE]
                if isinstance(weights, ray.ObjectRef):
                    weights = ray.get(weights)
                if isinstance(weights, dict) and DEFAULT_MODULE_ID in weights:
                    weights = weights[DEFAULT_MODULE_ID]
                self.backend.load_weights(hf_weights(weights))  # also drops K/V cached with the old weights
                self._weights_dropped = False
            if seq_no > 0:
                self._weights_seq_no = seq_no
        if WEIGHTS_VERSION in state:
            self._weights_version = int(state[WEIGHTS_VERSION])
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]
        if STATE_COUNTERS in state:
            self._num_calls = state[STATE_COUNTERS]["num_calls"]

    @override(Checkpointable)
    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config, "worker_index": self.worker_index}

    @override(Checkpointable)
    def get_checkpointable_components(self):
        return []
