"""What a user sees while `treerpo train` runs: held-out accuracy along training, the progress line,
TensorBoard.

Every ``eval_every`` iterations (and at iteration 0) the learners' current policy is evaluated on the first
``eval_every_problems`` held-out problems (pass@1 over ``eval_samples`` samples, and greedy accuracy); the
numbers go into metrics.jsonl under ``eval/*``, into the progress line and into learning_curve.png. For
TreeRPO they are the Algorithm's own evaluation (RLlib's evaluation_interval, set from these job fields:
rllib/evaluation.py), read from ``algo.train()``'s results, so the job and a Tune sweep see the same numbers;
RLlib's PPO is evaluated here, by :class:`HeldOut` on the learners' weights. Every
metrics row is also written as TensorBoard scalars under ``tb/`` (tensorboardX comes with ray[rllib]), so
``tensorboard --logdir runs`` shows runs like any RLlib or Tune run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rllib_treerpo.jobs.config import JobConfig
from rllib_treerpo.rllib.config import TreeRPOConfig

EVAL_KEYS = ("pass@1", "greedy_accuracy", "mean_response_tokens")


class HeldOut:
    """The held-out evaluation of one run: the env and settings fixed once, a policy's weights swapped in.

    With the hf backend the evaluator's model is loaded for each evaluation and freed after it: a whole copy
    of the policy less in memory for the run, for a load that is short next to an evaluation. A vllm engine is
    kept: it is this process's one engine (vLLM cannot run two side by side), the same one the local env
    runner samples with when the driver samples (same settings: shared by generation/vllm.py); with sleep mode
    it sleeps between evaluations.
    """

    def __init__(self, config: TreeRPOConfig, job: JobConfig, problems: int) -> None:
        from envs import make_reasoning_env
        from rllib_treerpo.sampling.evaluation import Evaluator

        env = make_reasoning_env(
            config.env, {**config.env_config, **job.eval_env_config}, field="eval_env_config"
        )
        limit = getattr(env, "num_problems", None)
        self.problems = min(problems, limit) if isinstance(limit, int) else problems
        self._build = functools.partial(
            Evaluator.from_model,
            config.model_name_or_path,
            env,
            dtype=config.dtype,
            backend=config.backend,
            chat_template=config.chat_template,
            system_prompt=config.system_prompt,
            problems=self.problems,
            samples=job.eval_samples,
            max_new_tokens=config.tree_spec().response_tokens,
            temperature=config.temperature,
            seed=config.seed or 0,
            backend_kwargs=config.backend_kwargs(),
        )
        self._kept = None if config.backend == "hf" else self._build()

    def __call__(self, weights: dict | None = None, problems: int | None = None) -> tuple[dict, list[dict]]:
        """Summary and per-problem rows of the given weights (None: the model as loaded) on ``problems``."""
        from rllib_treerpo.learner.memory import trim_heap

        evaluator = self._kept or self._build()
        evaluator.problems = self.problems if problems is None else min(problems, self.problems)
        try:
            return evaluator(weights)
        finally:
            evaluator.backend.release()  # e.g. a sleeping vLLM engine leaves the GPU to the training run
            del evaluator
            trim_heap()


class Monitor:
    """Evaluation along training, TensorBoard scalars and the progress line's held-out part."""

    def __init__(
        self,
        out: Path,
        job: JobConfig,
        held_out: HeldOut | None,
        evaluate: Callable[[Any, dict | None], dict] | None = None,
    ) -> None:
        """``evaluate(algo, result)``: the held-out summary of the algorithm's current policy (``result``: the
        iteration's results, which may carry it; None at iteration 0); None: ``held_out`` on the learners'
        weights."""
        self.job, self.held_out, self.latest = job, held_out, None
        self._evaluate = evaluate
        try:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
        except ImportError:  # no TensorBoard files then; metrics.jsonl and the plot have everything
            self.writer = None

    def due(self, iteration: int) -> bool:
        every = self.job.eval_every
        return bool(
            (self._evaluate is not None or self.held_out is not None)
            and every
            and (iteration % every == 0 or iteration == self.job.iterations)
        )

    def evaluate(self, algo: Any, result: dict | None = None) -> dict[str, float]:
        """``eval/*`` metrics of the algorithm's policy on the first eval_every_problems held-out problems."""
        if self._evaluate is not None:
            summary = self._evaluate(algo, result)
        else:
            from rllib_treerpo.rllib.rl_module import learner_policy_weights

            weights = learner_policy_weights(algo) if algo.iteration else None  # None: the model as loaded
            summary, _ = self.held_out(weights, self.job.eval_every_problems)
        self.latest = {f"eval/{k}": float(summary[k]) for k in EVAL_KEYS if k in summary}
        return self.latest

    def record(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "iteration" and isinstance(value, int | float) and value == value:  # finite numbers
                self.writer.add_scalar(key, value, row["iteration"])
        self.writer.flush()

    def progress(self) -> str:
        if not self.latest:
            return ""
        return (
            f"  held-out pass@1 {self.latest.get('eval/pass@1', float('nan')):.3f} greedy "
            f"{self.latest.get('eval/greedy_accuracy', float('nan')):.3f}"
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
