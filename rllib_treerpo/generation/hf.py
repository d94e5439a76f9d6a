"""The reference generation backend on transformers (CPU and GPU, fp32/bf16), with prefix sharing.

Cache design (why a tree costs little more than its unique tokens):
- Every sample returned by ``generate`` keeps its KV cache, keyed by its full token ids (context + new
  tokens); it covers all of them but the last token (the last sampled token was never fed).
- A context that equals (or extends) a kept key continues from that cache: only its uncached tail (one token
  for a tree's next level) is fed; any other context is prefilled. Identical contexts are fed once, then the
  context's K/V is expanded to its N samples (row copies): a node's prefix is encoded once, at one level.
- All contexts x samples of one call run in ONE decode loop: per-sample caches of different lengths are
  merged right-aligned (left padding) with an attention mask and explicit position ids.
- The K/V of a call live in buffers preallocated for the call (``SlotLayer``): a decode step writes one slot
  per row instead of torch.cat-ing the whole cache as DynamicLayer does (O(rows), not O(rows x length)).
- Rows stop individually. A finished row stays in the batch (masked, its work counted as ``pad_tokens``)
  until at least ``compact_fraction`` of the batch has finished; then the finished rows' K/V are set aside
  and the batch is compacted (one row copy); benchmarks/rollout.py --compaction compares the fractions.
- Memory is bounded: only the last call's samples are kept; ``clear_cache()`` / ``load_weights()`` drop them.

KV tensors are ``(batch, kv_heads, slots, head_dim)`` as transformers' DynamicLayer stores them; a "slot" is a
position along that axis, which differs from the token's position id when a row is left-padded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .base import GenerationBackend, Sample, SamplingParams, StopStringChecker
from .kv_slots import CacheEntry, Key, SlotCache, SlotLayer, longest_prefix, merge_entries, set_aside
from .sampling import finished_rows, sample_tokens


class HFBackend(GenerationBackend):
    """Hand-written decode loop over ``model(...)`` forward calls with per-sequence KV reuse (see module doc).

    Args:
        model: a transformers causal LM with full attention on every layer (Qwen2, Llama, ...); put it on
            its device and dtype first. The backend never trains it (eval mode, inference_mode).
        tokenizer: used to decode new tokens for ``stop_strings`` and for the pad/EOS ids.
        eos_token_ids: tokens that end a sample when ``stop_at_eos``; default: the tokenizer's EOS plus the
            model's generation_config EOS ids.
        cache_prefixes: keep the last call's sample caches for reuse (False: prefill every context).
        compact_fraction: compact the batch once this fraction of its rows has finished (0: at every finish).
        max_batch: most sample rows decoded together (None: all of a call's); a larger call is split into
            chunks.
    """

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_token_ids: Sequence[int] | None = None,
        cache_prefixes: bool = True,
        compact_fraction: float = 0.25,
        max_batch: int | None = None,
    ) -> None:
        super().__init__()
        layer_types = getattr(model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"the hf backend supports full-attention models only; layer_types={layer_types}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if eos_token_ids is None:
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            ids = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])}
            eos_token_ids = sorted(i for i in ids if i is not None)
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])
        self.cache_prefixes = cache_prefixes
        self.compact_fraction = float(compact_fraction)
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be a positive number of sample rows or None, got {max_batch}")
        self.max_batch = max_batch
        self._store: dict[Key, CacheEntry] = {}
        self._key_lengths: list[int] = []
        # state tensor name -> shape, while the weights are dropped (drop_weights)
        self._dropped: dict[str, torch.Size] | None = None

    # ----------------------------------------------------------------- interface
    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def clear_cache(self) -> None:
        self._store = {}
        self._key_lengths = []

    def release(self) -> None:
        self.clear_cache()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed K/V blocks back, e.g. to a learner on the same GPU

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        tokenizer: Any,
        *,
        dtype: str = "float32",
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> HFBackend:
        """``device``: where to put the model (e.g. "cuda" in an env runner given a GPU); default: the CPU."""
        from rllib_treerpo.models.model_io import load_causal_lm

        model = load_causal_lm(model_name_or_path, dtype)
        return cls(model if device is None else model.to(device), tokenizer, **kwargs)

    def weights(self) -> dict[str, torch.Tensor]:
        self._check_weights()
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def drop_weights(self) -> bool:
        """Each state tensor replaced by an empty one (its shape kept aside; a tied weight is one tensor);
        load_weights allocates them again and copies into them (casting to the sampler's dtype as it
        copies)."""
        if self._dropped is None:
            self.clear_cache()
            self._dropped = {}
            for name, tensor in self.model.state_dict(keep_vars=True).items():
                if tensor.numel():  # a tied weight's second name: already emptied through its first
                    self._dropped[name] = tensor.shape
                    tensor.data = tensor.new_empty(0)
        return True

    def load_weights(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        tensors = {k: torch.as_tensor(v) for k, v in state_dict.items()}
        if self._dropped is not None:
            missing = sorted(self._dropped.keys() - tensors.keys())
            if missing:
                raise ValueError(
                    f"hf backend: the weights were dropped; load_weights must bring back {missing}"
                )
            current = self.model.state_dict(keep_vars=True)
            for name, shape in self._dropped.items():
                current[name].data = current[name].new_empty(shape)
            self._dropped = None
        self.model.load_state_dict(tensors, strict=strict)
        self.clear_cache()  # cached K/V were computed by the old weights

    def _check_weights(self) -> None:
        if self._dropped is not None:
            raise RuntimeError("hf backend: the weights were dropped (drop_weights); load_weights first")

    @torch.inference_mode()
    def generate(
        self, contexts: Sequence[Sequence[int]], num_samples: int | Sequence[int], params: SamplingParams
    ) -> list[list[Sample]]:
        """Sample every context; at most ``max_batch`` sample rows decode together (the call is split into
        chunks of whole contexts transparently, each continuing from the previous call's kept caches)."""
        self._check_weights()
        start = time.perf_counter()
        counts = self._expand_num_samples(num_samples, len(contexts))
        keys = [tuple(int(t) for t in c) for c in contexts]
        self._check_contexts(keys, params.max_new_tokens)
        self.stats.generate_calls += 1
        previous = (self._store, self._key_lengths)
        self.clear_cache()
        out: list[list[Sample]] = [[] for _ in contexts]
        store: dict[Key, CacheEntry] = {}
        for chunk in self._chunks(counts):
            samples, entries = self._generate_rows(
                [keys[i] for i in chunk], [counts[i] for i in chunk], params, previous
            )
            for i, context_samples, context_entries in zip(chunk, samples, entries, strict=True):
                out[i] = context_samples
                if self.cache_prefixes:
                    for sample, entry in zip(context_samples, context_entries, strict=True):
                        store[keys[i] + tuple(sample.token_ids)] = entry
        del previous  # the previous call's K/V: every chunk has taken what it continues from
        self._store = store
        self._key_lengths = sorted({len(k) for k in store}, reverse=True)
        self.stats.decode_tokens += sum(len(s.token_ids) for samples in out for s in samples)
        self.stats.seconds += time.perf_counter() - start
        return out

    # ----------------------------------------------------------------- internals
    def _chunks(self, counts: list[int]) -> list[list[int]]:
        """Context indices in chunks of at most ``max_batch`` sample rows (a context is never split)."""
        chunks = []
        current = []
        rows = 0
        for i, n in enumerate(counts):
            if not n:
                continue
            if current and self.max_batch and rows + n > self.max_batch:
                chunks.append(current)
                current = []
                rows = 0
            current.append(i)
            rows += n
        return chunks + ([current] if current else [])

    def _generate_rows(
        self, keys: list[Key], counts: list[int], params: SamplingParams, previous: tuple[dict, list]
    ) -> tuple[list[list[Sample]], list[list[CacheEntry]]]:
        """One decode loop over ``keys`` x ``counts`` sample rows; per context its samples and their K/V."""
        unique: dict[Key, int] = {}  # identical contexts are fed once: unique context -> its sample rows
        row_unique: list[int] = []
        for key, n in zip(keys, counts, strict=True):
            row_unique += [unique.setdefault(key, len(unique))] * n
        ukeys = list(unique)
        logits, cache, mask, positions = self._prefill(ukeys, params.max_new_tokens, previous)
        if row_unique != list(range(len(ukeys))):
            rows = torch.tensor(row_unique, device=self.device)
            cache.batch_select_indices(rows)  # expand each context's K/V to its samples (row copies)
            logits = logits[rows]
            mask = mask[rows]
            positions = positions[rows]
        new_tokens, new_logps, reasons, entries = self._decode(logits, cache, mask, positions, params)
        samples = []
        kept = []
        row = 0
        for n in counts:
            samples.append([Sample(new_tokens[r], new_logps[r], reasons[r]) for r in range(row, row + n)])
            kept.append(entries[row : row + n])
            row += n
        return samples, kept

    def _prefill(
        self, ukeys: list[Key], max_new: int, previous: tuple[dict, list]
    ) -> tuple[torch.Tensor, SlotCache, torch.Tensor, torch.Tensor]:
        """Feed each unique context's uncached tail on top of its merged cache.

        Layout of row u: [pad | cached c_u slots | pad | tail s_u tokens]; cached parts right-aligned at Cmax,
        tails right-aligned in the Smax query window. Returns last-token logits (U, V), the cache, the 2D mask
        (U, Cmax + Smax) bool (True = real token), and the next position id per row (U,).
        """
        store, lengths = previous
        entries = [longest_prefix(k, store, lengths) if self.cache_prefixes else None for k in ukeys]
        cached = [len(e.slots) if e is not None else 0 for e in entries]
        self.stats.cache_hits += sum(c > 0 for c in cached)
        self.stats.cache_misses += sum(c == 0 for c in cached)
        n_u = len(ukeys)
        c_max = max(cached)
        tails = [k[c:] for k, c in zip(ukeys, cached, strict=True)]
        s_max = max(len(t) for t in tails)
        ids = np.full((n_u, s_max), self.pad_token_id, np.int64)
        pos = np.zeros((n_u, s_max), np.int64)
        mask = np.zeros((n_u, c_max + s_max), np.bool_)
        for u, (tail, c) in enumerate(zip(tails, cached, strict=True)):
            s = len(tail)
            ids[u, s_max - s :] = tail
            pos[u, s_max - s :] = np.arange(c, c + s)
            mask[u, c_max - c : c_max] = mask[u, c_max + s_max - s :] = True
        full = bool(mask.all())  # no padding: no mask, so SDPA may take its causal fast path
        ids, pos, mask = (torch.from_numpy(a).to(self.device) for a in (ids, pos, mask))
        layers = [SlotLayer(c_max + s_max + max_new) for _ in range(self.model.config.num_hidden_layers)]
        if c_max:
            merge_entries(entries, c_max, layers, self.device)
        cache = SlotCache(layers)
        del entries  # the merged copy is all that is needed: free the previous call's groups
        fed = sum(len(t) for t in tails)
        self.stats.prefill_tokens += fed
        self.stats.tokens_fed += fed
        self.stats.pad_tokens += n_u * s_max - fed
        self.stats.forward_calls += 1
        out = self.model(
            input_ids=ids,
            attention_mask=None if full else mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_pos = torch.tensor([len(k) for k in ukeys], device=self.device)
        return out.logits[:, -1, :], out.past_key_values, mask, next_pos

    def _feed(
        self,
        tokens: torch.Tensor,
        done: torch.Tensor,
        n_done: int,
        cache: SlotCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        no_padding: bool,
    ) -> tuple[SlotCache, torch.Tensor, torch.Tensor]:
        """One forward of each row's newest token (a finished row still in the batch feeds masked padding):
        the cache, the next logits (B, V) and the mask grown by one slot."""
        live_t = ~done
        mask = torch.cat([mask, live_t[:, None]], dim=1)
        self.stats.tokens_fed += done.shape[0] - n_done
        self.stats.pad_tokens += n_done
        self.stats.forward_calls += 1
        out = self.model(
            input_ids=torch.where(live_t, tokens, self.pad_token_id)[:, None],
            attention_mask=None if no_padding and not n_done else mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        return out.past_key_values, out.logits[:, -1, :], mask

    def _decode(
        self,
        logits: torch.Tensor,
        cache: SlotCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        params: SamplingParams,
    ) -> tuple[list[list[int]], list[list[float]], list[str], list[CacheEntry]]:
        """The batched decode loop. logits (B, V), mask (B, S) bool, positions (B,) next position ids.

        Returns per sample row: new token ids, their log-probs, finish reason, and where its K/V is kept.
        """
        n_rows = logits.shape[0]
        max_new = params.max_new_tokens
        device = self.device
        generator = torch.Generator(device=device)
        generator.seed() if params.seed is None else generator.manual_seed(int(params.seed))
        tok_buf = torch.zeros((n_rows, max_new), dtype=torch.long, device=device)
        lp_buf = torch.zeros((n_rows, max_new), dtype=torch.float32, device=device)
        lengths = [0] * n_rows
        reasons = [""] * n_rows
        entries = [None] * n_rows
        alive = list(range(n_rows))  # batch position -> sample row
        alive_t = torch.arange(n_rows, device=device)
        done = torch.zeros(n_rows, dtype=torch.bool, device=device)  # finished rows still in the batch
        n_done = 0
        stops = (
            StopStringChecker(self.tokenizer, params.stop_strings, n_rows) if params.stop_strings else None
        )
        no_padding = bool(mask.all())  # then the mask is all ones until a finished row stays in the batch
        for step in range(max_new):
            tokens, logps = sample_tokens(logits, params, generator)
            tok_buf[alive_t, step] = tokens
            lp_buf[alive_t, step] = logps
            newly, eos_hit, delim_hit = finished_rows(tokens, done, alive, stops, params, step, self._eos)
            for b in newly:
                lengths[alive[b]] = step + 1
                reasons[alive[b]] = "eos" if eos_hit[b] else "delimiter" if delim_hit[b] else "length"
            if newly:
                done[torch.tensor(newly, device=device)] = True
                n_done += len(newly)
            if n_done == len(alive):
                set_aside(cache, mask, None, alive, entries)
                break
            if n_done and n_done >= self.compact_fraction * len(alive):
                # Set the finished rows' K/V aside, then drop them from the batch.
                done_cpu = done.tolist()
                gone = [b for b, d in enumerate(done_cpu) if d]
                keep = torch.tensor([b for b, d in enumerate(done_cpu) if not d], device=device)
                set_aside(cache, mask, torch.tensor(gone, device=device), [alive[b] for b in gone], entries)
                cache.batch_select_indices(keep)
                mask = mask[keep]
                positions = positions[keep]
                tokens = tokens[keep]
                alive_t = alive_t[keep]
                alive = [alive[b] for b, d in enumerate(done_cpu) if not d]
                done = torch.zeros(len(alive), dtype=torch.bool, device=device)
                n_done = 0
            cache, logits, mask = self._feed(tokens, done, n_done, cache, mask, positions, no_padding)
            positions = positions + 1
        toks = tok_buf.tolist()
        lps = lp_buf.tolist()
        return (
            [t[:n] for t, n in zip(toks, lengths, strict=True)],
            [lp[:n] for lp, n in zip(lps, lengths, strict=True)],
            reasons,
            entries,
        )
