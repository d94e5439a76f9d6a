"""The Ray-free iteration core: minibatch plans, and one update through RLlib's learner equal to the replica's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from rllib_treerpo.iteration import LossSettings, minibatch_plan, policy_update, sample_iteration
from rllib_treerpo.rllib.algorithm import TreeRPOConfig
from rllib_treerpo.rows import build_training_batch


@pytest.mark.parametrize(
    "rows, size, epochs, parts", [(10, None, 1, 1), (10, 4, 1, 3), (9, 3, 2, 6), (3, 8, 1, 1)]
)
def test_minibatch_plan_trains_every_row_once_per_epoch(rows, size, epochs, parts):
    plan = minibatch_plan(rows, size, num_epochs=epochs, seed=3)
    assert len(plan) == parts
    per_epoch = len(plan) // epochs
    for e in range(epochs):
        assert sorted(np.concatenate(plan[e * per_epoch : (e + 1) * per_epoch]).tolist()) == list(range(rows))
    assert all(len(p) <= (size or rows) for p in plan)
    again = minibatch_plan(rows, size, num_epochs=epochs, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again, strict=True))  # a resumed run replays it


def sampled_rows(model_dir: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of real sampled trees (random tiny model, tau 0 so every non-degenerate group is kept)."""
    from envs import ArithmeticEnv
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.model_io import load_causal_lm, load_tokenizer
    from rllib_treerpo.sampler import TreeSpec

    tok = load_tokenizer(model_dir)
    backend = make_backend("hf", load_causal_lm(model_dir), tok)
    trees = sample_iteration(ArithmeticEnv(num_ops=1), backend, tok, TreeSpec((3, 2), 5), 3, seed=seed)
    for t in trees:  # random rewards: a random model rarely solves anything, and we want non-zero advantages
        for i, leaf in enumerate(t.leaves()):
            t.nodes[leaf].reward = float((i + seed) % 2)
    rows, _ = build_training_batch(trees, tau=0.0, advantage_std="group", value_estimate="child_mean")
    assert len(rows["input_ids"]) >= 6
    return rows


@pytest.mark.parametrize("minibatch_size, kl_coef, grad_clip", [(None, 0.0, 1.0), (4, 0.2, 0.05)])
def test_rllib_learner_and_replica_give_the_same_parameters(tiny_lm_dir, minibatch_size, kl_coef, grad_clip):
    config = TreeRPOConfig.from_yaml(
        None,
        {
            "model_name_or_path": tiny_lm_dir,
            "lr": 3e-3,
            "kl_coef": kl_coef,
            "grad_clip": grad_clip,
            "clip_eps_low": 0.1,
            "clip_eps_high": 0.3,
            "temperature": 0.9,
            "weight_decay": 0.01,
            "minibatch_size": minibatch_size,
        },
    )
    from envs import ArithmeticEnv

    env = ArithmeticEnv()
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})
    module = learner.module[DEFAULT_MODULE_ID]
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    replica = copy.deepcopy(module.model)
    reference = copy.deepcopy(module.model) if kl_coef else None
    rows = sampled_rows(tiny_lm_dir)
    plan_seed = 11

    for index in minibatch_plan(
        len(rows["input_ids"]), minibatch_size, seed=plan_seed
    ):  # what training_step does
        batch = {k: v[index] for k, v in rows.items()}
        learner.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=len(index)))
    optimizer = torch.optim.AdamW(replica.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    stats = policy_update(
        replica,
        optimizer,
        rows,
        LossSettings.from_config(config),
        minibatch_size=minibatch_size,
        grad_clip=grad_clip,
        seed=plan_seed,
        ref_model=reference,
    )

    assert len(stats) == (1 if minibatch_size is None else -(-len(rows["input_ids"]) // minibatch_size))
    if kl_coef:
        assert stats[-1]["kl"] > 0  # the reference term was live
    for (name, a), b in zip(module.model.state_dict().items(), replica.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert (
        max(float((module.model.state_dict()[k] - v).abs().max()) for k, v in initial.items()) > 1e-4
    )  # moved


def test_compute_loss_reports_the_sampler_mismatch_and_applies_tis():
    from rllib_treerpo.iteration import compute_loss
    from rllib_treerpo.losses import token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g)
    input_ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float64)
    learner = token_logprobs(logits, input_ids)
    sampler = (learner + 0.3 * torch.randn(2, 5, dtype=torch.float64, generator=g)) * mask  # e.g. vLLM's
    adv = torch.tensor([[1.0], [-2.0]], dtype=torch.float64) * mask
    batch = {"input_ids": input_ids, "loss_mask": mask, "advantages": adv, "old_logprobs": sampler}
    _, stats = compute_loss(logits, batch, LossSettings())
    mismatch = float(((learner - sampler).abs() * mask).sum() / mask.sum())
    assert stats["logprob_mismatch"] == pytest.approx(mismatch) and "tis_weight_mean" not in stats
    loss, stats = compute_loss(logits, batch, LossSettings(tis_cap=1.5))
    w = torch.exp(learner - sampler).clamp(max=1.5)
    assert loss.item() == pytest.approx(float(-(w * adv * mask).sum() / mask.sum()))  # on policy: rho = 1
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    assert stats["tis_weight_mean"] == pytest.approx(float((w * mask).sum() / mask.sum()))
