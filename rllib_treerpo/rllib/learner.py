"""TreeRPOTorchLearner: a thin adapter from RLlib's Learner to the Ray-free loss (losses.compute_loss).

The objective is docs/algorithm.md s.4. The batch is one minibatch of collated training packs
(batches.minibatches: input_ids, position_ids, token_node, node_parent, target_pos, target_ids, advantages,
old_logprobs, loss_weight), handed to ``LearnerGroup.update(batch=...)`` by TreeRPO.training_step, which plans
the minibatches itself. One update = one optimizer step: the minibatch is split into micro-batches of at most
``forward_tokens`` tokens whose gradients add up (the loss weights carry the minibatch's normalisation); the
gradients are freed after the step (they are not needed while trees are sampled or a checkpoint is written).
The learner never generates.

Precision (precision.py): the module's parameters are the master copy (float32 under mixed precision) and the
forward is autocast to ``dtype``; the optimizer state is in the parameters' dtype and goes into checkpoints as
tensors (RLlib's TorchLearner converts it to numpy, which fails on bf16), as views that pickle without a copy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from rllib_treerpo.core.losses import compute_loss
from rllib_treerpo.learner.batches import micro_batches
from rllib_treerpo.learner.forward import target_stats
from rllib_treerpo.learner.learner_model import reference_copy
from rllib_treerpo.learner.memory import trim_heap
from rllib_treerpo.learner.tensor_state import plain_tensor, state_tensors
from rllib_treerpo.learner.update import UpdateSettings, adamw


class TreeRPOTorchLearner(TorchLearner):
    @override(TorchLearner)
    def build(self) -> None:
        super().build()
        self._settings = {
            module_id: UpdateSettings.from_config(self.config.get_config_for_module(module_id))
            for module_id in self.module.keys()
        }
        # Frozen copy of the initial policy for the KL term; not built at all when kl_coef = 0.
        self._ref_models: dict[str, torch.nn.Module] = {}
        for module_id, settings in self._settings.items():
            if settings.loss.kl_coef > 0:
                self._ref_models[module_id] = reference_copy(self.module[module_id].unwrapped().model)
        # The iteration whose first minibatch this learner saw last (see before_gradient_based_update).
        self._last_lifetime = None
        self._first_update = True
        self._mismatch = float("nan")

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id]
        params = self.get_parameters(module)
        optimizer = adamw(params, lr=config.lr, weight_decay=config.weight_decay)
        self.register_optimizer(
            module_id=module_id, optimizer=optimizer, params=params, lr_or_lr_schedule=config.lr
        )

    @override(TorchLearner)
    def _uncompiled_update(self, batch: dict, **kwargs):
        """One optimizer step over the minibatch, its micro-batches' gradients summed (DDP syncs once)."""
        for optimizer in self._optimizer_parameters:
            optimizer.zero_grad(set_to_none=True)
        fwd_out = {}
        totals = {}
        for module_id, module_batch in batch.items():
            parts = micro_batches(module_batch, self._settings[module_id].batches.forward_tokens)
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                with contextlib.ExitStack() as stack:
                    if self.config.num_learners > 1 and not last:  # all-reduce the summed gradient once
                        stack.enter_context(self.module[module_id].no_sync())
                    out = self.module.forward_train({module_id: part})
                    losses = self.compute_losses(fwd_out=out, batch={module_id: part})
                    trim_heap()  # the forward's freed intermediates, before the backward's gradients
                    losses[module_id].backward()
                totals[module_id] = totals.get(module_id, 0.0) + losses[module_id].detach()
                fwd_out = out
        # the forward's freed activations and casts, before the optimizer state grows (at the first step)
        trim_heap()
        gradients = {pid: p.grad for pid, p in self._params.items() if p.grad is not None}
        with contextlib.ExitStack() as stack:
            if self.config.num_learners > 1:
                for module in self.module.values():
                    stack.enter_context(module.no_sync())
            self.apply_gradients(self.postprocess_gradients(gradients))
        del gradients
        for optimizer in self._optimizer_parameters:
            optimizer.zero_grad(set_to_none=True)
        return fwd_out, totals, {}

    @override(TorchLearner)
    def _get_optimizer_state(self) -> dict:
        """Each optimizer's state_dict as tensors (bf16 included), not numpy."""
        return {
            name: {
                "module_id": self._optimizer_name_to_module[name],
                "state": state_tensors(optim.state_dict()),
            }
            for name, optim in self._named_optimizers.items()
        }

    @override(TorchLearner)
    def _set_optimizer_state(self, state: dict) -> None:
        for name, entry in state.items():
            module_id = entry["module_id"]
            if name not in self._named_optimizers and module_id in self.module:
                self.configure_optimizers_for_module(
                    module_id=module_id, config=self.config.get_config_for_module(module_id=module_id)
                )
            if name in self._named_optimizers:
                saved = entry["state"]
                tensors = {
                    index: {k: plain_tensor(v).to(self._device) for k, v in values.items()}
                    for index, values in saved["state"].items()
                }
                self._named_optimizers[name].load_state_dict({**saved, "state": tensors})

    @override(TorchLearner)
    def before_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        # TreeRPO.training_step passes one lifetime count with every minibatch of an iteration: a new count is
        # a new iteration, whose first minibatch still sees the weights that sampled (what logprob_mismatch
        # measures).
        lifetime = timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME)
        self._first_update = lifetime is None or lifetime != self._last_lifetime
        self._last_lifetime = lifetime

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out) -> torch.Tensor:
        settings = self._settings[module_id]
        ref_logprobs = None
        if module_id in self._ref_models:
            with torch.no_grad():
                ref_logprobs, _ = target_stats(self._ref_models[module_id], batch, settings.forward)
        scale = max(1, self.config.num_learners)  # DDP averages the learners' gradients; the weights sum them
        loss, stats = compute_loss(
            fwd_out["logprobs"], batch, settings.loss, ref_logprobs, scale, entropy=fwd_out["entropy"]
        )
        # Later minibatches also see this iteration's own updates: they report the first one's measurement.
        if self._first_update:
            self._mismatch = stats["logprob_mismatch"]
        stats["logprob_mismatch"] = self._mismatch
        for name, value in stats.items():
            self.metrics.log_value((module_id, f"loss/{name}"), value, window=1)
        return loss
