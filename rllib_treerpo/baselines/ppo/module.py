"""A causal LM as an RLModule for RLlib's stock PPO on the token-id env (baselines/ppo/tokenized_env.py).

One action is one whole reasoning step (up to L tokens), so the action distribution is over token sequences:
log pi(step | context) = sum of the step's token log-probs under the LM (tempered logits, padding masked).

- exploration / inference: the step is sampled token by token from the LM through the generation backend
  (``make_backend("hf", ...)``: batched over the vectorised envs, stopping at the step delimiter or EOS, with
  per-token log-probs); greedy for inference. The module returns ACTIONS (``[n, ids..., pad]``, the env's
  layout), ACTION_LOGP (the step's summed log-prob) and, as ACTION_DIST_INPUTS, the per-token sampling
  log-probs (B, L).
- train: one teacher-forced forward over context + step gives the tempered logits of every step position;
  ACTION_DIST_INPUTS is (B, L, V + 1): those logits plus a last channel that masks the step's padding, read by
  :class:`StepTokensDistribution` (logp = masked sum, entropy = masked sum of per-position entropies along the
  sampled prefix, KL likewise).
- value (ValueFunctionAPI): a small MLP on the LM's last hidden state at the last context token. With
  ``value_detach`` (default) the value loss does not reach the LM, so the critic cannot disturb the policy.

RLlib's PPO KL term (``use_kl_loss``) would need the old full distribution of every step; the module does not
store it (per-token sampled log-probs only), so run PPO with ``use_kl_loss=False``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.distribution import Distribution
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override

from rllib_treerpo.rllib.rl_module import CausalLMModule


def _masked_logp(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, V + 1) -> log-softmax (B, L, V) of the logits and the (B, L) mask."""
    return torch.log_softmax(inputs[..., :-1].float(), dim=-1), inputs[..., -1]


class _ModuleSampledDistribution(Distribution):
    """A whole step is sampled token by token by the module (``forward_exploration``), never from here."""

    @override(Distribution)
    def sample(self, *, sample_shape=None, **kwargs):
        raise NotImplementedError(
            "steps are sampled token by token by the module's forward_exploration, not from this distribution"
        )

    @override(Distribution)
    def rsample(self, *, sample_shape=None, **kwargs):
        raise NotImplementedError("a token sequence has no reparameterised sample")


class StepTokensDistribution(_ModuleSampledDistribution):
    """Distribution over one step's tokens given its sampled prefix (the train distribution: module doc)."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = inputs
        self._logp, self._mask = _masked_logp(inputs)

    @override(Distribution)
    def logp(self, value: torch.Tensor, **kwargs) -> torch.Tensor:
        """Sum of the log-probs of ``value[:, 1:]`` (the step's ids) over the step's real positions."""
        ids = value[..., 1:].long().clamp(0, self._logp.shape[-1] - 1)
        picked = torch.gather(self._logp, -1, ids[..., None]).squeeze(-1)
        return (picked * self._mask).sum(-1)

    @override(Distribution)
    def entropy(self, **kwargs) -> torch.Tensor:
        return (-(self._logp.exp() * self._logp).sum(-1) * self._mask).sum(-1)

    @override(Distribution)
    def kl(self, other: Distribution, **kwargs) -> torch.Tensor:
        if not isinstance(other, StepTokensDistribution):
            raise NotImplementedError("KL is defined between two StepTokensDistribution over the same steps")
        per_pos = (self._logp.exp() * (self._logp - other._logp)).sum(-1)
        return (per_pos * self._mask).sum(-1)

    @staticmethod
    @override(Distribution)
    def required_input_dim(space, **kwargs) -> int:
        return int((len(space.nvec) - 1) * (int(space.nvec[1]) + 1))

    @classmethod
    @override(Distribution)
    def from_logits(cls, logits: torch.Tensor, **kwargs) -> StepTokensDistribution:
        return cls(logits)


class SampledStepDistribution(_ModuleSampledDistribution):
    """What the env runner keeps of a sampled step: its per-token log-probs (B, L), 0 at padding.

    ``logp`` is only meaningful for the step that was sampled (it ignores ``value``); ``entropy`` is the
    one-sample estimate -log pi(step). No KL: PPO's KL term needs the full old distribution (module doc).
    """

    def __init__(self, token_logprobs: torch.Tensor) -> None:
        super().__init__()
        self.token_logprobs = token_logprobs

    @override(Distribution)
    def logp(self, value: torch.Tensor = None, **kwargs) -> torch.Tensor:
        return self.token_logprobs.sum(-1)

    @override(Distribution)
    def entropy(self, **kwargs) -> torch.Tensor:
        return -self.token_logprobs.sum(-1)

    @override(Distribution)
    def kl(self, other: Distribution, **kwargs) -> torch.Tensor:
        raise NotImplementedError(
            "PPO's KL loss needs the old full per-token distribution, which the LM module "
            "does not store: set use_kl_loss=False"
        )

    @staticmethod
    @override(Distribution)
    def required_input_dim(space, **kwargs) -> int:
        return int(len(space.nvec) - 1)

    @classmethod
    @override(Distribution)
    def from_logits(cls, logits: torch.Tensor, **kwargs) -> SampledStepDistribution:
        return cls(logits)


class PPOCausalLMModule(CausalLMModule, ValueFunctionAPI):
    """Causal LM policy over whole steps plus a value head (model_config keys: see ``DEFAULTS``)."""

    DEFAULTS: dict[str, Any] = {
        "dtype": "float32",
        "mixed_precision": False,  # PPO trains the weights in dtype themselves
        "step_delimiter": None,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "stop_at_eos": True,
        "value_detach": True,
        "value_hidden": 128,
        "backend": "hf",
    }

    @override(CausalLMModule)
    def setup(self):
        super().setup()
        self.cfg = {**self.DEFAULTS, **(self.model_config or {})}
        self.step_tokens = int(self.action_space.nvec.shape[0] - 1)
        hidden = int(self.model.config.hidden_size)
        self.value_head = torch.nn.Sequential(
            torch.nn.Linear(hidden, self.cfg["value_hidden"]),
            torch.nn.Tanh(),
            torch.nn.Linear(self.cfg["value_hidden"], 1),
        )
        self._backend = None

    # --- distributions --------------------------------------------------------------------------
    @override(TorchRLModule)
    def get_train_action_dist_cls(self):
        return StepTokensDistribution

    @override(TorchRLModule)
    def get_exploration_action_dist_cls(self):
        return SampledStepDistribution

    @override(TorchRLModule)
    def get_inference_action_dist_cls(self):
        return SampledStepDistribution

    # --- acting: sample one step per observation ------------------------------------------------------
    @property
    def backend(self):
        if self._backend is None:
            from transformers import AutoTokenizer

            from rllib_treerpo.generation import make_backend

            tokenizer = AutoTokenizer.from_pretrained(self.cfg["model_name_or_path"])
            self._backend = make_backend(self.cfg["backend"], self.model, tokenizer)
        return self._backend

    def _act(self, batch: dict[str, Any], greedy: bool) -> dict[str, Any]:
        from rllib_treerpo.generation import SamplingParams

        obs = torch.as_tensor(batch[Columns.OBS]).long().cpu().numpy()
        contexts = [row[1 : 1 + int(row[0])].tolist() for row in obs]
        c = self.cfg
        width = self.step_tokens
        params = SamplingParams(
            max_new_tokens=width,
            temperature=0.0 if greedy else c["temperature"],
            top_p=c["top_p"],
            top_k=c["top_k"],
            stop_at_eos=c["stop_at_eos"],
            stop_strings=(c["step_delimiter"],) if c["step_delimiter"] else (),
            seed=int(torch.randint(0, 2**31 - 1, ()).item()),
        )  # the global RNG, which RLlib seeds per runner
        samples = [s[0] for s in self.backend.generate(contexts, 1, params)]
        pad = self.backend.pad_token_id
        actions = np.full((len(samples), width + 1), pad, dtype=np.int64)
        token_logp = np.zeros((len(samples), width), dtype=np.float32)
        for i, s in enumerate(samples):
            n = len(s.token_ids)
            actions[i, 0] = n
            actions[i, 1 : 1 + n] = s.token_ids
            token_logp[i, :n] = s.logprobs
        token_logp_t = torch.from_numpy(token_logp)
        return {
            Columns.ACTIONS: torch.from_numpy(actions),
            Columns.ACTION_LOGP: token_logp_t.sum(-1),
            Columns.ACTION_DIST_INPUTS: token_logp_t,
        }

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch, greedy=False)

    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch, greedy=True)

    @override(CausalLMModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch, greedy=False)

    # --- learning: teacher-forced log-probs of the sampled steps, values --------------------------------
    def _lm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )

    @staticmethod
    def _context(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + M) packed observations -> (B, M) ids and their lengths (B,)."""
        return obs[:, 1:].long(), obs[:, 0].long().clamp(min=1)

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        ids, n_ctx = self._context(batch[Columns.OBS])
        actions = batch[Columns.ACTIONS].long()
        n_act = actions[:, 0]
        act_ids = actions[:, 1:]
        b, width = act_ids.shape
        arange = torch.arange(width, device=ids.device)
        # Right-padded rows: context, then the step (written after each row's own context).
        full = torch.cat([ids, torch.zeros_like(act_ids)], dim=1)
        full.scatter_(1, n_ctx[:, None] + arange, act_ids)
        total = n_ctx + n_act
        used = int(total.max())
        full = full[:, :used]
        attention = (torch.arange(used, device=ids.device) < total[:, None]).long()
        out = self._lm(full, attention)
        # Logits at position p predict token p + 1: step token j is predicted at n_ctx - 1 + j.
        pos = (n_ctx[:, None] - 1 + arange).clamp(max=used - 1)
        logits = torch.gather(out.logits, 1, pos[..., None].expand(-1, -1, out.logits.shape[-1]))
        logits = logits.float() / max(self.cfg["temperature"], 1e-6)
        mask = (arange < n_act[:, None]).to(logits.dtype)
        last = out.hidden_states[-1][torch.arange(b, device=ids.device), n_ctx - 1]
        return {
            Columns.ACTION_DIST_INPUTS: torch.cat([logits, mask[..., None]], dim=-1),
            Columns.EMBEDDINGS: last,
        }

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> torch.Tensor:
        if embeddings is None:  # e.g. the GAE connector on a whole train batch: forward in chunks
            ids, n_ctx = self._context(torch.as_tensor(batch[Columns.OBS]))
            parts = []
            for start in range(0, len(ids), 256):
                chunk = ids[start : start + 256]
                n = n_ctx[start : start + 256]
                used = int(n.max())
                chunk = chunk[:, :used]
                attention = (torch.arange(used, device=chunk.device) < n[:, None]).long()
                hidden = self._lm(chunk, attention).hidden_states[-1]
                parts.append(hidden[torch.arange(len(chunk), device=chunk.device), n - 1])
            embeddings = torch.cat(parts)
        if self.cfg["value_detach"]:
            embeddings = embeddings.detach()
        return self.value_head(embeddings.float()).squeeze(-1)

    @override(CausalLMModule)
    def set_state(self, state) -> None:
        super().set_state(state)
        if self._backend is not None:
            self._backend.clear_cache()  # cached K/V were computed with the old weights
