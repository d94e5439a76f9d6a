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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_causal_lm(model_name_or_path: str | None, dtype: str = "float32"):
    """``AutoModelForCausalLM.from_pretrained`` with a clear error when no model is configured."""
    from transformers import AutoModelForCausalLM

    if not model_name_or_path:
        raise ValueError("config field 'model_name_or_path' is not set: give a model folder or hub name "
                         "(`treerpo train` sets it to its warm-started tiny model when it is null)")
    if dtype not in DTYPES:
        raise ValueError(f"config field 'dtype' = {dtype!r}: must be one of {list(DTYPES)}")
    return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=DTYPES[dtype])


class CausalLMModule(TorchRLModule):
    """Wraps ``self.model`` (a transformers causal LM). forward -> {"logits": (B, T, V)}."""

    @override(TorchRLModule)
    def setup(self):
        cfg = self.model_config or {}
        self.model = load_causal_lm(cfg.get("model_name_or_path"), cfg.get("dtype", "float32"))

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return {"logits": out.logits}

    @override(TorchRLModule)
    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs):
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    @override(TorchRLModule)
    def set_state(self, state) -> None:
        self.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
