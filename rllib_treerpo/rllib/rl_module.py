"""A causal language model as an RLlib RLModule: the policy of TreeRPO (and, with a value head, of PPO).

The Hugging Face model is loaded with ``from_pretrained(model_name_or_path)``: a local folder (the tiny model
that `treerpo train` builds) or any hub name the user's machine can reach. Its parameters are the learner's
master copy (precision.py: float32 under mixed precision, the forward autocast to ``dtype``); optionally its
layers are gradient-checkpointed. State goes in and out as torch tensors, never numpy (RLlib's default
get_state converts to numpy, which fails on bf16 and doubles fp16), as views that pickle without a copy
(tensor_state.StateTensor); the inference-only state (the weight sync to the env runners) is cast to
``dtype``, the sampler's.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override

from rllib_treerpo.config.settings import FIELDS, default_value
from rllib_treerpo.learner.forward import ForwardSettings, target_stats
from rllib_treerpo.learner.learner_model import load_trainable
from rllib_treerpo.learner.precision import cast_floating, resolve_cpu_dtype
from rllib_treerpo.learner.tensor_state import plain_tensor, state_tensors
from rllib_treerpo.models.model_io import hf_weights
from rllib_treerpo.rllib.model_files import local_model_folder

# The model_config keys of the module: TreeRPO's fields of the same names (their defaults where not given).
MODEL_CONFIG_KEYS = (
    "model_name_or_path",
    "dtype",
    "mixed_precision",
    "gradient_checkpointing",
    "pack_attention",
    "temperature",
    "logits_chunk",
)


class CausalLMModule(TorchRLModule):
    """Wraps ``self.model`` (a transformers causal LM). The training forward takes collated packs (packing.py)
    and returns {"logprobs": (B, M), "entropy": (B, M)} of each loss token at the sampling temperature
    (forward.target_stats: the LM head inside the module's forward, so DDP sees it when num_learners > 1).
    model_config: :data:`MODEL_CONFIG_KEYS` (TreeRPOConfig passes its fields); a key not given takes the
    field's default, or the subclass's :attr:`DEFAULTS`."""

    DEFAULTS: dict[str, Any] = {}

    @override(TorchRLModule)
    def setup(self):
        cfg = {
            **{key: default_value(FIELDS[key]) for key in MODEL_CONFIG_KEYS},
            **self.DEFAULTS,
            **(self.model_config or {}),
        }
        dtype = resolve_cpu_dtype(cfg["dtype"], None)  # a config resolves auto before; a bare module here
        self.forward_settings = ForwardSettings(
            attention=cfg["pack_attention"],
            temperature=cfg["temperature"],
            logits_chunk=cfg["logits_chunk"],
            dtype=dtype,
        )
        self.compute_dtype = dtype
        self.model = load_trainable(
            local_model_folder(cfg["model_name_or_path"], who="a learner"),  # a driver-only folder too
            dtype,
            mixed_precision=cfg["mixed_precision"],
            gradient_checkpointing=cfg["gradient_checkpointing"],
        )

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        logprobs, entropy = target_stats(self.model, batch, self.forward_settings)
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
