"""Memory and precision (precision.py, learner_model.py, tensor_state.py): gradient checkpointing and
token-bounded micro-batches give the same update; mixed precision moves the parameters like float32 does; bf16
runs checkpoint, resume bit-exactly and export; states pickle without copies."""

from __future__ import annotations

import copy
import io
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rllib_treerpo.config.settings import FIELDS, default_value
from rllib_treerpo.learner.learner_model import enable_gradient_checkpointing
from rllib_treerpo.learner.tensor_state import state_tensors
from rllib_treerpo.learner.update import UpdateSettings, policy_update
from rllib_treerpo.models.model_io import load_causal_lm
from tests.unit.packs_util import hand_packs


def replica_config(**overrides):
    values = {name: default_value(field) for name, field in FIELDS.items()}
    values.update(grad_clip=1.0, num_epochs=1, num_minibatches=2, **overrides)
    return UpdateSettings.from_config(SimpleNamespace(**values))


@pytest.mark.parametrize("attention", ["segments", "dense"])
def test_checkpointing_and_token_micro_batches_give_the_same_update_fp32(tiny_lm_dir, attention):
    """SGD at lr 1: the update is the (clipped) gradient itself, so any difference would show unamplified."""
    _, _, packs = hand_packs(seed=4, trees=3)
    base = load_causal_lm(tiny_lm_dir)
    updates, recomputed = {}, {}
    for name, checkpointing, forward_tokens in (("plain", False, None), ("bounded", True, 24)):
        model = copy.deepcopy(base)
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls, layer = [], model.model.layers[0]
        layer.forward = lambda *a, _f=layer.forward, _c=calls, **k: (
            _c.append(1) or _f(*a, **k)
        )  # recomputes too
        config = replica_config(pack_attention=attention, forward_tokens=forward_tokens)
        policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), packs, config, seed=3)
        updates[name] = {k: v - base.state_dict()[k] for k, v in model.state_dict().items()}
        recomputed[name] = len(calls)
    # 2 minibatches (2 packs + 1): one forward each, or one per pack under the 24-token bound, each run again
    # in the backward (checkpointing)
    assert recomputed == {"plain": 2, "bounded": 2 * 3}
    assert max(float(u.abs().max()) for u in updates["plain"].values()) > 1e-3
    for key, value in updates["plain"].items():
        torch.testing.assert_close(updates["bounded"][key], value, atol=1e-7, rtol=1e-5, msg=key)


def one_learner_step(model_dir: str, lr: float, **precision):
    """The RLlib learner's first update on hand-made packs: (initial float32 weights, weights after,
    learner)."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from envs import ArithmeticEnv
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig
    from tests.unit.packs_util import hand_batch

    config = TreeRPOConfig.from_yaml(
        None, {"model_name_or_path": model_dir, "lr": lr, "num_minibatches": 1, **precision}
    )
    env = ArithmeticEnv()
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})
    model = learner.module[DEFAULT_MODULE_ID].model
    before = {k: v.float().clone() for k, v in model.state_dict().items()}
    batch = hand_batch(seed=1)
    learner.update(
        batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batch)}, env_steps=len(batch["input_ids"]))
    )
    return before, {k: v.float() for k, v in model.state_dict().items()}, learner


def test_mixed_precision_moves_the_parameters_like_float32(tiny_lm_dir):
    """One AdamW step at lr 3e-5: float32 moves every parameter that has a gradient; bf16 weights round most
    of those updates away; bf16 compute with float32 masters moves them like float32 does, in the same
    direction."""
    moved, delta = {}, {}
    for name, precision in (
        ("fp32", {"dtype": "float32"}),
        ("mixed", {"dtype": "bfloat16", "mixed_precision": True}),
        ("pure", {"dtype": "bfloat16", "mixed_precision": False}),
    ):
        before, after, learner = one_learner_step(tiny_lm_dir, 3e-5, **precision)
        changed = sum(int((after[k] != before[k]).sum()) for k in before)
        moved[name] = changed / sum(v.numel() for v in before.values())
        delta[name] = torch.cat([(after[k] - before[k]).flatten() for k in before])
        optimizer = learner.get_state()["optimizer"]["default_policy_default_optimizer"]["state"]
        masters = torch.float32 if name != "pure" else torch.bfloat16
        assert {v["exp_avg"].dtype for v in optimizer["state"].values()} == {masters}  # tensors, not numpy
    assert moved["fp32"] > 0.5
    assert moved["mixed"] > 0.95 * moved["fp32"]
    assert moved["pure"] < 0.5 * moved["fp32"]  # 30% here: near-zero weights (biases) have fine bf16 steps
    cosine = torch.nn.functional.cosine_similarity(delta["mixed"], delta["fp32"], dim=0)
    assert cosine > 0.9, cosine


def test_states_pickle_without_copies():
    """Protocol 5 hands out each tensor's own memory (no copy); a round trip gives plain tensors of every
    dtype."""
    state = {
        "w": torch.randn(4, 3),
        "b": torch.randn(5).to(torch.bfloat16),
        "step": torch.tensor(3.0),
        "ids": torch.arange(4),
        "nested": {"m": [torch.ones(2)]},
    }
    views = state_tensors(state)
    buffers = []
    pickle.dumps(views, protocol=5, buffer_callback=buffers.append)
    pointers = {np.frombuffer(b.raw(), np.uint8).ctypes.data for b in buffers}
    assert pointers == {t.data_ptr() for t in (state["w"], state["b"], state["step"], state["ids"])} | {
        state["nested"]["m"][0].data_ptr()
    }
    f = io.BytesIO()
    pickle.dump(views, f, protocol=5)
    back = pickle.loads(f.getvalue())
    assert type(back["b"]) is torch.Tensor and back["b"].dtype == torch.bfloat16
    assert back["step"].shape == () and back["ids"].dtype == torch.int64
    assert all(torch.equal(back[k], state[k]) for k in ("w", "b", "step", "ids"))
    assert torch.equal(back["nested"]["m"][0], state["nested"]["m"][0])
    back["w"].add_(1.0)  # restored optimizer state is written in place: it must be writable


@pytest.mark.ray
def test_bf16_run_checkpoints_resumes_bit_exactly_and_exports(
    tiny_lm_dir, tmp_path, ray_session, monkeypatch
):
    import json
    from pathlib import Path

    from envs.arithmetic import ArithmeticEnv
    from rllib_treerpo.models.model_io import MODULE_PATH, hf_weights, read_module_state, save_hf_folder
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig
    from rllib_treerpo.rllib.learner import TreeRPOTorchLearner
    from rllib_treerpo.rllib.rl_module import learner_policy_weights

    values = {
        "model_name_or_path": tiny_lm_dir,
        "branching": [2, 2],
        "step_tokens": 6,
        "prompts_per_iteration": 2,
        "tau": 0.0,
        "lr": 1e-3,
        "env_config": {"num_ops": 1},
        "seed": 0,
        "num_minibatches": 2,
        "dtype": "bfloat16",
        "gradient_checkpointing": True,
    }
    # A random model never solves a problem: a reward from the response's characters gives most groups an
    # advantage (the local env runner samples in this process).
    monkeypatch.setattr(
        ArithmeticEnv, "_score", lambda self, response, answer: float(sum(map(ord, response)) % 2)
    )
    sampler_params_at_updates = []  # the sampler beside the learner frees its copy for the update
    update = TreeRPOTorchLearner._uncompiled_update

    def spy(self, batch, **kwargs):
        sampler_params_at_updates.append(sum(p.numel() for p in first.env_runner.backend.model.parameters()))
        return update(self, batch, **kwargs)

    monkeypatch.setattr(TreeRPOTorchLearner, "_uncompiled_update", spy)
    first = TreeRPOConfig.from_yaml(None, values).build_algo()
    first.train()
    first.save_to_path(str(tmp_path / "ckpt"))
    first.train()
    assert len(sampler_params_at_updates) == 4 and set(sampler_params_at_updates) == {0}
    expected = learner_policy_weights(first)
    sampler = first.env_runner.backend.weights()
    first.stop()
    assert {v.dtype for v in expected.values()} == {torch.float32}  # the masters
    assert {v.dtype for v in sampler.values()} == {torch.bfloat16}  # the sampler's copy, synced from them
    assert all(torch.equal(sampler[k], v.to(torch.bfloat16)) for k, v in expected.items())
    saved = hf_weights(read_module_state(Path(tmp_path / "ckpt") / MODULE_PATH))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert (
        max(float((expected[k] - v).abs().max()) for k, v in saved.items()) > 1e-4
    )  # the 2nd iteration learned

    resumed = TreeRPOConfig.from_yaml(None, values).build_algo()
    resumed.restore_from_path(str(tmp_path / "ckpt"))
    resumed.train()
    weights = learner_policy_weights(resumed)
    state = resumed.learner_group.get_state()["learner"]["optimizer"]
    resumed.stop()
    assert all(torch.equal(weights[k], v) for k, v in expected.items())  # bit-exact
    assert {v["exp_avg"].dtype for v in next(iter(state.values()))["state"]["state"].values()} == {
        torch.float32
    }

    save_hf_folder(tiny_lm_dir, weights, tmp_path / "final_model", "bfloat16")
    assert json.loads((tmp_path / "final_model" / "config.json").read_text())["dtype"] == "bfloat16"
    exported = load_causal_lm(str(tmp_path / "final_model"), "bfloat16")
    assert all(torch.equal(exported.state_dict()[k], v.to(torch.bfloat16)) for k, v in weights.items())
    base = load_causal_lm(tiny_lm_dir)
    assert exported.generation_config.to_dict() == base.generation_config.to_dict()
    assert (exported.lm_head.weight is exported.model.embed_tokens.weight) == (
        base.lm_head.weight is base.model.embed_tokens.weight
    )


def test_gpu_check_runs_on_cpu(capsys):
    import json

    from benchmarks import gpu_check

    result = gpu_check.main(["--device", "cpu", "--tiny"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["learner"] == result["learner"] and line["sampling"]["decode_tokens"] == 2 * (2 + 4) * 4
    rows, packed, checkpointed = result["learner"]
    assert rows["loss_tokens"] == packed["loss_tokens"] == checkpointed["loss_tokens"] == 48
    assert rows["tokens"] > packed["tokens"] == checkpointed["tokens"]
    assert all(x["tokens_per_s"] > 0 for x in result["learner"])


@pytest.mark.ray
def test_an_iteration_without_an_update_still_gives_the_sampler_its_weights_back(tiny_lm_dir, ray_session):
    """Every group filtered (tau 1): no learner update, yet the dropped sampler copy is refilled by the sync
    and the next iteration samples."""
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig
    from rllib_treerpo.rllib.rl_module import learner_policy_weights

    values = {
        "model_name_or_path": tiny_lm_dir,
        "branching": [2],
        "step_tokens": 4,
        "prompts_per_iteration": 2,
    }
    algo = TreeRPOConfig.from_yaml(None, {**values, "tau": 1.0}).build_algo()
    try:
        for _ in range(2):
            assert algo.train()["loss/optimizer_steps"] == 0.0
        sampler, masters = algo.env_runner.backend.weights(), learner_policy_weights(algo)
    finally:
        algo.stop()
    assert all(torch.equal(sampler[k], v) for k, v in masters.items())
