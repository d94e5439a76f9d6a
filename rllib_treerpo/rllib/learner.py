"""TreeRPOTorchLearner: a thin adapter from RLlib's Learner to the Ray-free loss (iteration.compute_loss, SPEC.md s.4).

The batch is one minibatch of the rows that :func:`rllib_treerpo.rows.build_training_batch` produces (input_ids,
attention_mask, loss_mask, advantages, old_logprobs), handed to ``LearnerGroup.update(batch=...)`` by
TreeRPO.training_step, which plans the minibatches itself. The learner never generates.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from rllib_treerpo.iteration import LossSettings, compute_loss, model_logits


class TreeRPOTorchLearner(TorchLearner):
    @override(TorchLearner)
    def build(self) -> None:
        super().build()
        # Frozen copy of the initial policy for the KL term; not built at all when kl_coef = 0.
        self._ref_models: dict[str, torch.nn.Module] = {}
        for module_id in self.module.keys():
            if self.config.get_config_for_module(module_id).kl_coef > 0:
                ref = copy.deepcopy(self.module[module_id].unwrapped().model).eval()
                ref.requires_grad_(False)
                self._ref_models[module_id] = ref

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id]
        params = self.get_parameters(module)
        optimizer = torch.optim.AdamW(params, weight_decay=config.weight_decay)
        self.register_optimizer(
            module_id=module_id, optimizer=optimizer, params=params, lr_or_lr_schedule=config.lr
        )

    @override(TorchLearner)
    def before_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        # TreeRPO.training_step passes one lifetime count with every minibatch of an iteration: a new count is a new
        # iteration, whose first minibatch still sees the weights that sampled (what logprob_mismatch measures).
        lifetime = timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME)
        self._first_update = lifetime is None or lifetime != getattr(self, "_last_lifetime", None)
        self._last_lifetime = lifetime

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out) -> torch.Tensor:
        ref_logits = None
        if module_id in self._ref_models:
            with torch.no_grad():
                ref_logits = model_logits(self._ref_models[module_id], batch)
        loss, stats = compute_loss(fwd_out["logits"], batch, LossSettings.from_config(config), ref_logits)
        # Later minibatches also see this iteration's own updates: they report the first one's measurement.
        if getattr(self, "_first_update", True):
            self._mismatch = stats["logprob_mismatch"]
        stats["logprob_mismatch"] = self._mismatch
        for name, value in stats.items():
            self.metrics.log_value((module_id, f"loss/{name}"), value, window=1)
        return loss
