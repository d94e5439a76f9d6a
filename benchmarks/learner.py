"""What the learner pays: the same trained nodes of the same sampled trees, one row per node vs tree-packed.

Two tree shapes on a tiny random Qwen2 (CPU, fp32): (a) the default tree of configs/tiny_arith.yaml ([4,4,4] x
16 tokens, 32 prompts) and (b) the paper's [8,8,8] x 384 tokens (1 prompt by default), EOS off so every tree
is full. For each, the trees are sampled once; then, each in a fresh process (peak memory is per process), the
forward + backward of the policy loss (and of the reference model's forward when --kl > 0) over all trained
nodes, in micro-batches of --forward-tokens tokens, in the per-row layout and the packed one. Peak memory
twice: the process's resident memory (RSS, what the machine pays; it also holds what glibc's allocator keeps
after frees, which varies by up to ~15% from run to run) and the peak of live tensor bytes (one more pass
under the torch profiler: the CPU's max_memory_allocated, independent of the allocator). Prints a table and
one JSON line per shape, the paper shape's last: {"rows_tokens", "packed_tokens", "rows_seconds",
"packed_seconds", "rows_peak_mb", "packed_peak_mb", "rows_tensor_peak_mb", "packed_tensor_peak_mb",
"max_logprob_diff", "max_grad_rel_diff", "shape"}.

    python -m benchmarks.learner [--paper-prompts 1] [--kl 0.0] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rllib_treerpo.learner.precision import hardware_keys

SHAPES = {
    "default": {"branching": (4, 4, 4), "step_tokens": 16, "prompts": 32},
    "paper": {"branching": (8, 8, 8), "step_tokens": 384, "prompts": 1},
}


def tiny_model(max_positions: int):
    from rllib_treerpo.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    return tok, build_tiny_model(len(tok), max_positions=max_positions, seed=0).eval()


def sample(shape: str, prompts: int, path: Path) -> None:
    """Sample the trees of a shape once (EOS off: full trees) with random rewards; pickle trees +
    advantages."""
    import numpy as np

    from envs import ArithmeticEnv
    from rllib_treerpo.core.advantages import tree_advantages
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.sampling.sampler import TreeSpec, sample_iteration

    s = SHAPES[shape]
    tok, model = tiny_model(2048)
    spec = TreeSpec(s["branching"], s["step_tokens"], stop_at_eos=False)
    env = ArithmeticEnv(max_steps=len(s["branching"]))
    trees = sample_iteration(env, make_backend("hf", model, tok), tok, spec, prompts, seed=0)
    rng = np.random.default_rng(0)
    for tree in trees:  # varied rewards: every group kept at tau 0, so every node is trained
        for leaf in tree.leaves():
            tree.nodes[leaf].reward = float(rng.integers(0, 2))
    advantages = [tree_advantages(t.parent_array(), t.leaf_rewards(), tau=0.0)[1] for t in trees]
    path.write_bytes(pickle.dumps((trees, advantages)))


class PeakRSS:
    """The process's resident memory sampled every 5 ms while the block runs: peak minus the value at
    entry."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def above_start(self) -> float:
        return self.peak - self.start


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(path: Path, layout: str, args) -> dict:
    """In this process: forward + backward over every trained node; seconds, peak RSS, log-probs,
    gradients."""
    import numpy as np
    import torch

    from rllib_treerpo.learner.batches import collate_minibatch, micro_batches
    from rllib_treerpo.learner.packing import pack_trees

    torch.set_num_threads(args.threads)
    trees, advantages = pickle.loads(path.read_bytes())
    _, model = tiny_model(2048)
    ref = tiny_model(2048)[1] if args.kl > 0 else None
    packs = pack_trees(trees, advantages, layout=layout, pack_tokens=args.pack_tokens)
    batch = {k: torch.as_tensor(v) for k, v in collate_minibatch(packs, "token_mean", 0).items()}
    parts = micro_batches(batch, args.forward_tokens)
    settings = _settings(args)
    times, peaks = [], []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with PeakRSS() as rss:
            _forward_backward(model, ref, parts, settings)
        times.append(time.perf_counter() - start)
        peaks.append(rss.above_start)
    model.zero_grad(set_to_none=True)
    tensor_peak = _tensor_peak_mb(lambda: _forward_backward(model, ref, parts, settings))
    # per loss token, sorted by (tree, node, token): comparable across layouts
    order = np.lexsort(
        (
            np.concatenate([np.arange(p.loss_tokens) for p in packs]),
            np.concatenate([p.target_node for p in packs]),
            np.concatenate([[p.tree] * p.loss_tokens for p in packs]),
        )
    )
    flat = _in_pack_order(packs, batch, model) if args.check else np.zeros(0)
    return {
        "tokens": int(sum(len(p.input_ids) for p in packs)),
        "seconds": min(times),
        "peak_mb": max(peaks),
        "tensor_peak_mb": tensor_peak,
        "packs": len(packs),
        "forwards": len(parts),
        "logprobs": flat[order].tolist() if len(flat) else [],
        "grads": {n: q.grad.double().norm().item() for n, q in model.named_parameters()},
        "grad_vectors": {
            n: q.grad.flatten()[:: max(1, q.grad.numel() // 2000)].tolist()
            for n, q in model.named_parameters()
        },
    }


def _settings(args):
    """The default config's update settings with the benchmark's kl_coef and attention."""
    from dataclasses import replace
    from types import SimpleNamespace

    from rllib_treerpo.config.settings import FIELDS, default_value
    from rllib_treerpo.learner.update import UpdateSettings

    defaults = UpdateSettings.from_config(
        SimpleNamespace(
            **{name: default_value(field) for name, field in FIELDS.items()}, num_epochs=1, grad_clip=None
        )
    )
    return replace(
        defaults,
        loss=replace(defaults.loss, kl_coef=args.kl),
        forward=replace(defaults.forward, attention=args.attention),
    )


def _forward_backward(model, ref, parts, settings) -> None:
    """The learner's work on one minibatch: per micro-batch the packed forward(s), the loss, backward."""
    import torch

    from rllib_treerpo.core.losses import compute_loss
    from rllib_treerpo.learner.forward import target_stats

    for part in parts:
        ref_logprobs = None
        if ref is not None:
            with torch.no_grad():
                ref_logprobs, _ = target_stats(ref, part, settings.forward)
        logprobs, entropy = target_stats(model, part, settings.forward)
        loss, _ = compute_loss(logprobs, part, settings.loss, ref_logprobs, entropy=entropy)
        loss.backward()


def _tensor_peak_mb(work) -> float:
    """Peak of live CPU tensor bytes while ``work()`` runs, above those live at its start (torch profiler)."""
    import numpy as np
    import torch

    cpu = torch.autograd.DeviceType.CPU
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        work()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    return float(np.cumsum([0] + [n for _, n in events]).max()) / 2**20


def _in_pack_order(packs, batch, model):
    """Log-probs of every loss token, concatenated pack by pack (one extra no-grad forward)."""
    import numpy as np
    import torch

    from rllib_treerpo.learner.forward import packed_logits

    out = []
    with torch.no_grad():
        for r in range(len(packs)):
            row = {k: v[r : r + 1] for k, v in batch.items()}
            lp = torch.log_softmax(packed_logits(model, row, "segments").float(), -1).gather(
                -1, row["target_ids"][..., None]
            )
            out.append(lp[0, : packs[r].loss_tokens, 0].numpy())
    return np.concatenate(out)


def run_shape(shape: str, args) -> dict:
    """Sample the shape's trees, measure both layouts in fresh processes, print the table; the JSON line."""
    import numpy as np

    prompts = args.paper_prompts if shape == "paper" else SHAPES[shape]["prompts"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trees.pkl"
        sample(shape, prompts, path)
        flags = [
            "--kl",
            str(args.kl),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--forward-tokens",
            str(args.forward_tokens),
            "--pack-tokens",
            str(args.pack_tokens),
            "--attention",
            args.attention,
            "--check" if args.check else "--no-check",
        ]
        r = {}
        for layout in ("rows", "packed"):
            cmd = [sys.executable, "-m", "benchmarks.learner", "--measure", str(path), layout, *flags]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r[layout] = json.loads(out.strip().splitlines()[-1])
    rows, packed = r["rows"], r["packed"]
    diff = (
        float(np.abs(np.subtract(rows["logprobs"], packed["logprobs"])).max()) if args.check else float("nan")
    )
    rel = max(
        float(np.abs(np.subtract(rows["grad_vectors"][n], packed["grad_vectors"][n])).max())
        / max(rows["grads"][n], 1e-30)
        for n in rows["grads"]
    )
    print(
        f"\n{shape}: {SHAPES[shape]['branching']} x {SHAPES[shape]['step_tokens']} tokens, {prompts} "
        "prompt(s), "
        f"kl {args.kl}, {args.attention} attention, forward budget {args.forward_tokens} tokens, pack budget "
        f"{args.pack_tokens}"
    )
    print(
        "| layout | packs | forwards | tokens fed | seconds (fwd+bwd) | peak RSS MB above start | peak "
        "tensor MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, m in r.items():
        print(
            f"| {name} | {m['packs']} | {m['forwards']} | {m['tokens']:,} | {m['seconds']:.2f} | "
            f"{m['peak_mb']:.0f} "
            f"| {m['tensor_peak_mb']:.0f} |"
        )
    print(
        f"packed/rows: tokens {packed['tokens'] / rows['tokens']:.3f}, seconds "
        f"{packed['seconds'] / rows['seconds']:.3f}, "
        f"peak memory {packed['peak_mb'] / max(rows['peak_mb'], 1):.3f} (RSS), "
        f"{packed['tensor_peak_mb'] / max(rows['tensor_peak_mb'], 1):.3f} (tensors); max |log-prob diff| "
        f"{diff:.2e}, max "
        f"relative gradient diff {rel:.2e}"
    )
    return {
        "rows_tokens": rows["tokens"],
        "packed_tokens": packed["tokens"],
        "rows_seconds": round(rows["seconds"], 3),
        "packed_seconds": round(packed["seconds"], 3),
        "rows_peak_mb": round(rows["peak_mb"], 1),
        "packed_peak_mb": round(packed["peak_mb"], 1),
        "rows_tensor_peak_mb": round(rows["tensor_peak_mb"], 1),
        "packed_tensor_peak_mb": round(packed["tensor_peak_mb"], 1),
        "max_logprob_diff": diff,
        "max_grad_rel_diff": rel,
        "shape": shape,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper-prompts", type=int, default=1)
    p.add_argument("--kl", type=float, default=0.0, help="kl_coef: > 0 adds the reference model's forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--forward-tokens", type=int, default=16384)
    p.add_argument("--pack-tokens", type=int, default=8192)
    p.add_argument("--shapes", default="default,paper")
    p.add_argument("--attention", default="segments", choices=("segments", "dense"), help="packed attention")
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare per-token log-probs across layouts (an extra no-grad forward)",
    )
    p.add_argument("--measure", nargs=2, metavar=("TREES", "LAYOUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:  # the child process
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args)))
        return
    lines = [run_shape(shape, args) for shape in args.shapes.split(",")]
    for line in lines:
        print(json.dumps({**line, **hardware_keys()}))


if __name__ == "__main__":
    main()
