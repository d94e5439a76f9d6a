"""TreeRPOTorchLearner: a thin adapter from RLlib's Learner to the Ray-free loss (iteration.compute_loss, SPEC.md s.4).

The batch is one minibatch of collated training packs (iteration.minibatches: input_ids, position_ids, token_node,
node_parent, target_pos, target_ids, advantages, old_logprobs, loss_weight), handed to
``LearnerGroup.update(batch=...)`` by TreeRPO.training_step, which plans the minibatches itself. One update = one
optimizer step: the minibatch is split into micro-batches of at most ``forward_tokens`` tokens whose gradients
add up (the loss weights carry the minibatch's normalisation). The learner never generates.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from rllib_treerpo.iteration import LossSettings, compute_loss, micro_batches
from rllib_treerpo.packing import packed_logits


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
    def _uncompiled_update(self, batch: dict, **kwargs):
        """One optimizer step over the minibatch, its micro-batches' gradients accumulated (DDP syncs once)."""
        for optimizer in self._optimizer_parameters:
            optimizer.zero_grad(set_to_none=True)
        fwd_out, totals = {}, {}
        for module_id, module_batch in batch.items():
            parts = micro_batches(module_batch, self.config.get_config_for_module(module_id).forward_tokens)
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                with contextlib.ExitStack() as stack:
                    if self.config.num_learners > 1 and not last:  # all-reduce the summed gradient once
                        stack.enter_context(self.module[module_id].no_sync())
                    out = self.module.forward_train({module_id: part})
                    losses = self.compute_losses(fwd_out=out, batch={module_id: part})
                    losses[module_id].backward()
                totals[module_id] = totals.get(module_id, 0.0) + losses[module_id].detach()
                fwd_out = out
        gradients = {pid: p.grad for pid, p in self._params.items() if p.grad is not None}
        with contextlib.ExitStack() as stack:
            if self.config.num_learners > 1:
                for module in self.module.values():
                    stack.enter_context(module.no_sync())
            self.apply_gradients(self.postprocess_gradients(gradients))
        return fwd_out, totals, {}

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
                ref_logits = packed_logits(self._ref_models[module_id], batch, config.pack_attention)
        scale = max(1, self.config.num_learners)  # DDP averages the learners' gradients; the weights sum them
        loss, stats = compute_loss(
            fwd_out["logits"], batch, LossSettings.from_config(config), ref_logits, scale
        )
        # Later minibatches also see this iteration's own updates: they report the first one's measurement.
        if getattr(self, "_first_update", True):
            self._mismatch = stats["logprob_mismatch"]
        stats["logprob_mismatch"] = self._mismatch
        for name, value in stats.items():
            self.metrics.log_value((module_id, f"loss/{name}"), value, window=1)
        return loss
