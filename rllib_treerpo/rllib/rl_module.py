"""A causal language model as an RLlib RLModule: the policy of TreeRPO (and, with a value head, of PPO).

The Hugging Face model is loaded with ``from_pretrained(model_name_or_path)``: a local folder (the tiny model
that `treerpo train` builds) or any hub name the user's machine can reach. Its parameters are the learner's master
copy (precision.py: float32 under mixed precision, the forward autocast to ``dtype``); optionally its layers are
gradient-checkpointed. State goes in and out as torch tensors, never numpy (RLlib's default get_state converts to
numpy, which fails on bf16 and doubles fp16), as views that pickle without a copy (precision.StateTensor); the
inference-only state (the weight sync to the env runners) is cast to ``dtype``, the sampler's.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override

from rllib_treerpo.model_io import hf_weights
from rllib_treerpo.packing import packed_target_stats
from rllib_treerpo.precision import (
    cast_floating,
    compute_context,
    load_trainable,
    plain_tensor,
    state_tensors,
)


class CausalLMModule(TorchRLModule):
    """Wraps ``self.model`` (a transformers causal LM). The training forward takes collated packs (packing.py)
    and returns {"logprobs": (B, M), "entropy": (B, M)} of each loss token at the sampling temperature (the LM
    head inside the module's forward, so DDP sees it when num_learners > 1; never a (B, M, V) logits block:
    ``logits_chunk`` positions at a time). model_config: model_name_or_path, dtype, mixed_precision (default
    false here: TreeRPOConfig passes its field), gradient_checkpointing, pack_attention, temperature,
    logits_chunk."""

    @override(TorchRLModule)
    def setup(self):
        cfg = self.model_config or {}
        self.compute_dtype = cfg.get("dtype", "float32")
        self.model = load_trainable(
            cfg.get("model_name_or_path"),
            self.compute_dtype,
            mixed_precision=cfg.get("mixed_precision", False),
            gradient_checkpointing=cfg.get("gradient_checkpointing", False),
        )

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        cfg = self.model_config or {}
        with compute_context(self.model, self.compute_dtype):
            logprobs, entropy = packed_target_stats(
                self.model,
                batch,
                cfg.get("pack_attention", "segments"),
                cfg.get("temperature", 1.0),
                cfg.get("logits_chunk"),
            )
        return {"logprobs": logprobs, "entropy": entropy}

    @override(TorchRLModule)
    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if inference_only:  # the sampler's copy
            state = cast_floating(state, self.compute_dtype)
        return state_tensors({k: v.cpu() for k, v in state.items()})

    @override(TorchRLModule)
    def set_state(self, state) -> None:
        self.load_state_dict({k: plain_tensor(v) for k, v in state.items()}, strict=True)


def learner_policy_weights(algo) -> dict:
    """The learners' current policy under Hugging Face names (a PPO value head is left out)."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    state = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}")
    return hf_weights(state[COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID])
