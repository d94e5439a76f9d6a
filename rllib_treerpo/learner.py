"""TreeRPOTorchLearner: a thin adapter that feeds training rows to losses.py (SPEC.md s.4).

The batch is what :func:`rllib_treerpo.tree.flatten_trees` produces (input_ids, attention_mask, loss_mask,
advantages, old_logprobs), handed to ``LearnerGroup.update(batch=...)``, which splits it over learners and into
minibatches. The learner never generates.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from rllib_treerpo.losses import policy_loss, token_entropy, token_logprobs


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
        self.register_optimizer(module_id=module_id, optimizer=optimizer, params=params,
                                lr_or_lr_schedule=config.lr)

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out) -> torch.Tensor:
        logits = fwd_out["logits"]  # (B, T, V)
        input_ids, mask = batch["input_ids"], batch["loss_mask"]
        logprobs = token_logprobs(logits, input_ids, config.temperature)
        ref_logprobs = None
        if module_id in self._ref_models:
            with torch.no_grad():
                ref_logits = self._ref_models[module_id](input_ids=input_ids,
                                                         attention_mask=batch["attention_mask"]).logits
                ref_logprobs = token_logprobs(ref_logits, input_ids, config.temperature)
        loss, stats = policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask,
            eps_low=config.clip_eps_low, eps_high=config.clip_eps_high, ref_logprobs=ref_logprobs,
            kl_coef=config.kl_coef, kl_estimator=config.kl_estimator, loss_agg=config.loss_agg,
        )
        with torch.no_grad():
            entropy = (token_entropy(logits, config.temperature) * mask).sum() / mask.sum().clamp(min=1)
        for name, value in {**stats, "entropy": entropy, "total": loss.detach()}.items():
            self.metrics.log_value((module_id, f"loss/{name}"), value.item(), window=1)
        # One call per minibatch: the optimizer steps of this update (minibatch_size is in rows, and how many
        # rows a tree batch keeps depends on its shape and on tau, so the count is worth seeing).
        self.metrics.log_value((module_id, "loss/optimizer_steps"), 1.0, reduce="sum")
        return loss
