"""A causal language model as an RLlib RLModule: the policy of TreeRPO (and, with a value head, of PPO).

The Hugging Face model is loaded with ``from_pretrained(model_name_or_path)``: a local folder (the tiny model
that `treerpo train` builds) or any hub name the user's machine can reach. State goes in and out as torch
tensors, never numpy: RLlib's default get_state converts to numpy, which fails on bf16 and doubles fp16.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override

from rllib_treerpo.model_io import hf_weights, load_causal_lm
from rllib_treerpo.packing import packed_logits


class CausalLMModule(TorchRLModule):
    """Wraps ``self.model`` (a transformers causal LM). The training forward takes collated packs (packing.py)
    and returns {"logits": (B, M, V)} at the positions that predict each loss token (inside the module's forward,
    so DDP sees it when num_learners > 1)."""

    @override(TorchRLModule)
    def setup(self):
        cfg = self.model_config or {}
        self.model = load_causal_lm(cfg.get("model_name_or_path"), cfg.get("dtype", "float32"))

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {
            "logits": packed_logits(self.model, batch, self.model_config.get("pack_attention", "segments"))
        }

    @override(TorchRLModule)
    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    @override(TorchRLModule)
    def set_state(self, state) -> None:
        self.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def learner_policy_weights(algo) -> dict[str, torch.Tensor]:
    """The learners' current policy under Hugging Face names (a PPO value head is left out)."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    state = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}")
    return hf_weights(state[COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID])
