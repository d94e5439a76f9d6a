"""The Ray-free update (batches.py, update.py, losses.compute_loss): minibatch plans, and one update through
RLlib's learner equal to the replica's."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from rllib_treerpo.core.losses import LossSettings, compute_loss
from rllib_treerpo.learner.batches import BatchSettings, minibatch_plan, minibatches
from rllib_treerpo.learner.rows import PackSettings, build_training_batch
from rllib_treerpo.learner.update import UpdateSettings, adamw, policy_update
from rllib_treerpo.rllib.algorithm import TreeRPOConfig
from rllib_treerpo.sampling.sampler import sample_iteration


def fake_packs(tokens: list[int]):
    return [SimpleNamespace(loss_tokens=n) for n in tokens]


@pytest.mark.parametrize(
    "tokens, k, epochs, parts",
    [([5] * 10, 1, 1, 1), ([5] * 10, 4, 1, 4), ([1, 50, 2, 3, 4, 5, 6, 7, 8], 3, 2, 6), ([3, 3], 8, 1, 2)],
)
def test_minibatch_plan_trains_every_pack_once_per_epoch_in_k_parts(tokens, k, epochs, parts):
    packs = fake_packs(tokens)
    plan = minibatch_plan(packs, k, num_epochs=epochs, seed=3)
    assert len(plan) == parts
    per_epoch = len(plan) // epochs
    for e in range(epochs):
        epoch = plan[e * per_epoch : (e + 1) * per_epoch]
        assert sorted(i for part in epoch for i in part) == list(range(len(tokens)))
    assert plan == minibatch_plan(packs, k, num_epochs=epochs, seed=3)  # a resumed run replays it
    if len(set(tokens)) == 1:  # equal packs: equal parts
        assert max(map(len, plan)) - min(map(len, plan)) <= 1


def test_minibatch_parts_have_about_equal_loss_tokens():
    rng = np.random.default_rng(0)
    packs = fake_packs(rng.integers(1, 40, size=200).tolist())
    for part in minibatch_plan(packs, 4, seed=1):
        share = sum(packs[i].loss_tokens for i in part) / sum(p.loss_tokens for p in packs)
        assert 0.2 < share < 0.3


def sampled_packs(model_dir: str, seed: int = 0):
    """Packs of real sampled trees (random tiny model, varied rewards so tau 0 keeps every group)."""
    from envs import ArithmeticEnv
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.models.model_io import load_causal_lm, load_tokenizer
    from rllib_treerpo.sampling.sampler import TreeSpec

    tok = load_tokenizer(model_dir)
    backend = make_backend("hf", load_causal_lm(model_dir), tok)
    trees = sample_iteration(ArithmeticEnv(num_ops=1), backend, tok, TreeSpec((3, 2), 5), 3, seed=seed)
    for t in trees:  # a random model rarely solves anything
        for i, leaf in enumerate(t.leaves()):
            t.nodes[leaf].reward = float((i + seed) % 2)
    # one pack per node: several minibatches of several packs
    settings = PackSettings.from_config(TreeRPOConfig().training(tau=0.0, packing=False))
    packs, _ = build_training_batch(trees, settings)
    assert len(packs) >= 6
    return packs


BF16_MIXED = {"dtype": "bfloat16", "mixed_precision": True, "gradient_checkpointing": True}


@pytest.mark.parametrize(
    "num_minibatches, kl_coef, grad_clip, forward_tokens, precision",
    [(1, 0.0, 1.0, None, {}), (3, 0.2, 0.05, 40, {}), (3, 0.2, 0.05, 40, BF16_MIXED)],
)
def test_rllib_learner_and_replica_give_the_same_parameters(
    tiny_lm_dir, num_minibatches, kl_coef, grad_clip, forward_tokens, precision
):
    """Also with mixed precision (float32 masters, bf16 autocast, checkpointed layers): the replica computes
    the same way from a copy of the module's model."""
    from envs import ArithmeticEnv

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
            "num_minibatches": num_minibatches,
            "forward_tokens": forward_tokens,
            "loss_agg": "seq_mean_token_mean",
            **precision,
        },
    )
    env = ArithmeticEnv()
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})
    module = learner.module[DEFAULT_MODULE_ID]
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # masters, also under bf16
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    replica = copy.deepcopy(module.model)
    reference = copy.deepcopy(module.model) if kl_coef else None
    packs = sampled_packs(tiny_lm_dir)
    seed = 11

    for batch in minibatches(
        packs, BatchSettings.from_config(config), pad_id=0, seed=seed
    ):  # what TreeRPO.training_step does
        rows = len(batch["input_ids"])
        learner.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=rows))
    optimizer = adamw(replica.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    stats = policy_update(
        replica, optimizer, packs, UpdateSettings.from_config(config), seed=seed, ref_model=reference
    )

    assert len(stats) == num_minibatches
    if kl_coef:
        assert stats[-1]["kl"] > 0  # the reference term was live
    for (name, a), b in zip(module.model.state_dict().items(), replica.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert (
        max(float((module.model.state_dict()[k] - v).abs().max()) for k, v in initial.items()) > 1e-4
    )  # moved


def test_compute_loss_reports_the_sampler_mismatch_and_applies_tis():
    from rllib_treerpo.learner.forward import target_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, generator=g)  # at the predicting positions
    targets = torch.randint(0, 7, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    learner = target_logprobs(logits, targets)
    sampler = (learner + 0.3 * torch.randn(2, 3, dtype=torch.float64, generator=g)) * mask  # e.g. vLLM's
    adv = torch.tensor([[1.0], [-2.0]], dtype=torch.float64) * mask
    batch = {
        "target_ids": targets,
        "loss_weight": mask / mask.sum(),
        "advantages": adv,
        "old_logprobs": sampler,
    }
    settings = LossSettings.from_config(TreeRPOConfig())
    _, stats = compute_loss(learner, batch, settings)
    mismatch = float(((learner - sampler).abs() * mask).sum() / mask.sum())
    assert stats["logprob_mismatch"] == pytest.approx(mismatch) and "tis_weight_mean" not in stats
    loss, stats = compute_loss(learner.clone().requires_grad_(), batch, replace(settings, tis_cap=1.5))
    w = torch.exp(learner - sampler).clamp(max=1.5)
    assert loss.item() == pytest.approx(float(-(w * adv * mask).sum() / mask.sum()))  # on policy: rho = 1
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    assert stats["tis_weight_mean"] == pytest.approx(float((w * mask).sum() / mask.sum()))
