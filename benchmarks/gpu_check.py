"""GPU check without Ray: a random model with Qwen2.5-0.5B's shapes, what sampling and learning
cost.

The GPU image has torch and transformers but neither Ray nor gymnasium, so this uses the Ray-free core only:
  (a) tree sampling with the hf backend at the paper's tree shape ([8, 8, 8] x 384-token steps, EOS off: full
  trees) from ``--prompts`` random prompts, on a bf16 copy of the weights (the sampler's copy): decode
  tokens/s, tokens fed, peak device memory; (b) the learner's update on those trees (random 0/1 leaf rewards,
  tau 0: every node trained), each layout from the same float32 master weights and a fresh AdamW, the forward
  autocast to bf16 (mixed precision, rllib_treerpo/learner/precision.py), through update.policy_update (what
  the RLlib learner does): per-row (one row per node), packed (tree packs), packed with gradient
  checkpointing. Tokens fed, seconds, tokens/s, the learner's peak memory above what was allocated before it
  (its weights, gradients, AdamW state, activations, logits) and that in bytes per parameter. Peak memory:
  torch.cuda.max_memory_allocated on CUDA; on CPU the process's resident memory sampled every 5 ms
  (benchmarks/learner.py's PeakRSS), a loose figure. Prints a table and ends with one JSON line.

    python -m benchmarks.gpu_check                        # cuda, Qwen2.5-0.5B shapes, paper tree, 1 prompt
    python -m benchmarks.gpu_check --device cpu --tiny    # a tiny model and tree: seconds on CPU (the test)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from types import SimpleNamespace

import numpy as np
import torch

from rllib_treerpo.learner.precision import hardware_keys

# hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
SHAPES = {"qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True), "tiny": (64, 2, 4, 2, 128, 512, True)}
LAYOUTS = {"rows": ("rows", False), "packed": ("packed", False), "packed+gc": ("packed", True)}


def build_model(shape: str, device: str, max_positions: int, seed: int = 0):
    """A random Qwen2 of ``shape`` in float32 (the master copy) on ``device``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv_heads, inter, vocab, tied = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(config).eval()


class Peak:
    """Peak memory in MB above the value at entry (CUDA: max_memory_allocated; CPU: sampled RSS)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Peak:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            from benchmarks.learner import PeakRSS

            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._rss.__exit__(*exc)
            self.mb = self._rss.above_start


def grow(backend, prompts: list[list[int]], branching: list[int], step_tokens: int):
    """Full trees (EOS off), level by level, every level of every tree in one generate call."""
    from rllib_treerpo.core.tree import Tree
    from rllib_treerpo.generation import SamplingParams

    trees = [Tree(prompt_ids=p) for p in prompts]
    frontier = [(t, 0) for t in range(len(trees))]
    for level, n in enumerate(branching):
        params = SamplingParams(max_new_tokens=step_tokens, stop_at_eos=False, seed=level)
        out = backend.generate([trees[t].path_ids(i).tolist() for t, i in frontier], n, params)
        last = level == len(branching) - 1
        frontier = [
            (t, trees[t].add_node(i, s.token_ids, s.logprobs, s.finish_reason, terminal=last))
            for (t, i), samples in zip(frontier, out, strict=True)
            for s in samples
        ]
    return trees


def sampling(master, args) -> tuple[list, dict]:
    """(a): the trees and the sampler's numbers."""
    from rllib_treerpo.generation.hf import HFBackend

    sampler = copy.deepcopy(master).to(torch.bfloat16).eval()
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)  # ids only: nothing is decoded
    backend = HFBackend(sampler, tokenizer, eos_token_ids=[], max_batch=args.generation_batch)
    rng = np.random.default_rng(0)
    vocab = master.config.vocab_size
    prompts = [rng.integers(1, vocab, size=args.prompt_tokens).tolist() for _ in range(args.prompts)]
    with Peak(args.device) as peak:
        start = time.perf_counter()
        trees = grow(backend, prompts, args.branching, args.step_tokens)
        _sync(args.device)
        seconds = time.perf_counter() - start
    stats = backend.stats
    del backend, sampler
    return trees, {
        "decode_tokens": stats.decode_tokens,
        "tokens_fed": stats.tokens_fed,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(stats.decode_tokens / seconds, 1),
        "peak_mb": round(peak.mb),
    }


def learner_config(args, layout: str):
    from rllib_treerpo.config.settings import FIELDS, default_value
    from rllib_treerpo.learner.update import UpdateSettings

    values = {name: default_value(field) for name, field in FIELDS.items()}
    values.update(
        dtype="bfloat16",
        packing=layout == "packed",
        pack_tokens=args.pack_tokens,
        forward_tokens=args.forward_tokens,
        num_minibatches=1,
        num_epochs=1,
        grad_clip=1.0,
    )
    return UpdateSettings.from_config(SimpleNamespace(**values))


def learning(master, trees: list, name: str, args) -> dict:
    """(b) for one layout: a fresh master copy and AdamW, one warm-up step on one pack, then the measured
    update."""
    from rllib_treerpo.core.advantages import tree_advantages
    from rllib_treerpo.learner.learner_model import enable_gradient_checkpointing
    from rllib_treerpo.learner.packing import pack_trees
    from rllib_treerpo.learner.update import policy_update

    layout, checkpointing = LAYOUTS[name]
    rng = np.random.default_rng(1)
    for tree in trees:
        for leaf in tree.leaves():
            tree.nodes[leaf].reward = float(rng.integers(0, 2))
    advantages = [tree_advantages(t.parent_array(), t.leaf_rewards(), tau=0.0)[1] for t in trees]
    packs = pack_trees(trees, advantages, layout=layout, pack_tokens=args.pack_tokens)
    config = learner_config(args, layout)
    with Peak(args.device) as peak:
        model = copy.deepcopy(master)
        if checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        policy_update(model, optimizer, packs[:1], config)  # warm-up (kernels, AdamW state)
        _sync(args.device)
        start = time.perf_counter()
        policy_update(model, optimizer, packs, config)
        _sync(args.device)
        seconds = time.perf_counter() - start
    del model, optimizer
    tokens = int(sum(len(p.input_ids) for p in packs))
    params = sum(p.numel() for p in master.parameters())
    return {
        "layout": name,
        "packs": len(packs),
        "tokens": tokens,
        "loss_tokens": int(sum(p.loss_tokens for p in packs)),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_mb": round(peak.mb),
        "bytes_per_param": round(peak.mb * 2**20 / params, 1),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_table(r: dict) -> None:
    s = r["sampling"]
    print(
        f"{r['shape']}: {r['parameters'] / 1e6:.1f}M parameters on {r['device_name']} (torch {r['torch']}); "
        "tree "
        f"{r['branching']} x {r['step_tokens']} tokens, {r['prompts']} prompt(s) of {r['prompt_tokens']} "
        "tokens"
    )
    print(
        f"sampling (bf16 copy, hf backend): {s['decode_tokens']:,} decode tokens, {s['tokens_fed']:,} fed, "
        f"{s['seconds']} s, {s['tokens_per_s']:,} tok/s, peak {s['peak_mb']:,} MB"
    )
    print(
        "| learner layout | packs | tokens fed | loss tokens | seconds | tokens/s | peak MB | bytes/param |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for x in r["learner"]:
        print(
            f"| {x['layout']} | {x['packs']} | {x['tokens']:,} | {x['loss_tokens']:,} | {x['seconds']} | "
            f"{x['tokens_per_s']:,} | {x['peak_mb']:,} | {x['bytes_per_param']} |"
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--tiny", action="store_true", help="tiny model and tree ([2, 2] x 4 tokens): the CPU test"
    )
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--branching", default="8,8,8")
    p.add_argument("--step-tokens", type=int, default=384)
    p.add_argument("--generation-batch", type=int, default=512, help="the hf backend's max_batch")
    p.add_argument("--forward-tokens", type=int, default=8192, help="tokens per learner forward")
    p.add_argument("--pack-tokens", type=int, default=8192)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {list(LAYOUTS)}")
    args = p.parse_args(argv)
    if args.tiny:
        args.prompts, args.prompt_tokens, args.branching, args.step_tokens = 2, 8, "2,2", 4
        args.forward_tokens, args.pack_tokens = 64, 32
    args.branching = [int(n) for n in args.branching.split(",")]
    shape = "tiny" if args.tiny else "qwen2.5-0.5b"
    master = build_model(shape, args.device, args.prompt_tokens + len(args.branching) * args.step_tokens + 8)
    trees, sampled = sampling(master, args)
    learner = [learning(master, trees, name, args) for name in args.layouts.split(",")]
    on_cuda = args.device.startswith("cuda")
    result = {
        "shape": shape,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__,
        "parameters": sum(q.numel() for q in master.parameters()),
        **{k: getattr(args, k) for k in ("prompts", "prompt_tokens", "branching", "step_tokens")},
        "forward_tokens": args.forward_tokens,
        "sampling": sampled,
        "learner": learner,
    }
    print_table(result)
    print(json.dumps({**result, **hardware_keys()}))
    return result


if __name__ == "__main__":
    main()
