"""What the learner pays: the same trained nodes of the same sampled trees, one row per node vs tree-packed,
and the packed learner against the bare compute on its tokens.

Three tree shapes on a tiny random Qwen2 (CPU, fp32): (a) the default tree of configs/tiny_arith.yaml ([4,4,4]
x 16 tokens, 32 prompts), (b) the paper's [8,8,8] x 384 tokens (1 prompt by default) and (c) the GRPO recipe's
group (configs/tiny_arith_grpo.yaml: [16] x 48 tokens, 32 prompts), EOS off so every tree is full. For each,
the trees are sampled once; then, each layout in a fresh process (peak memory is per process), one learner
step over all trained nodes as one minibatch: in micro-batches of --forward-tokens tokens the forward +
backward of the policy loss (and the reference model's forward when --kl > 0), then the AdamW step; in the
per-row layout and the packed one. In the packed process, interleaved with it, the bare compute on the same
packed rows: the same model's plain forward (causal attention over each row, the full logits), a cross-entropy
of the same targets, backward and the AdamW step, none of the learner's machinery; ``overhead`` = packed
seconds / bare seconds (CPU seconds: this process's, steady on a shared machine). Peak memory twice: the
process's resident memory (RSS, what the machine pays; it also holds what glibc's allocator keeps after
frees, which varies by up to ~15% from run to run) and the peak of live tensor bytes (one more pass under the
torch profiler: the CPU's max_memory_allocated, independent of the allocator). Prints a table and one JSON
line per shape: {"rows_tokens", "packed_tokens", "rows_seconds", "packed_seconds", "bare_seconds",
"overhead", "packed_cpu_seconds", "bare_cpu_seconds", "rows_peak_mb", "packed_peak_mb", "bare_peak_mb",
"rows_tensor_peak_mb", "packed_tensor_peak_mb", "bare_tensor_peak_mb", "max_logprob_diff",
"max_grad_rel_diff", "shape"} (rows_* null with --layouts packed).

    python -m benchmarks.learner [--shapes default,paper,grpo] [--layouts rows,packed] [--paper-prompts 1] \
        [--kl 0.0] [--threads 2] [--repeats 2]
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
    "grpo": {"branching": (16,), "step_tokens": 48, "prompts": 32},
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
    """In this process: the learner step over every trained node (and, packed, the bare compute on the same
    rows, interleaved); seconds, CPU seconds, peak RSS, peak tensor bytes, log-probs, gradients."""
    import numpy as np
    import torch

    from rllib_treerpo.learner.batches import collate_minibatch, micro_batches
    from rllib_treerpo.learner.packing import pack_trees
    from rllib_treerpo.learner.update import adamw

    torch.set_num_threads(args.threads)
    trees, advantages = pickle.loads(path.read_bytes())
    _, model = tiny_model(2048)
    ref = tiny_model(2048)[1] if args.kl > 0 else None
    packs = pack_trees(trees, advantages, layout=layout, pack_tokens=args.pack_tokens)
    batch = {k: torch.as_tensor(v) for k, v in collate_minibatch(packs, "token_mean", 0).items()}
    parts = micro_batches(batch, args.forward_tokens)
    settings = _settings(args)
    # gradients and log-probs at the initial weights, compared across layouts
    model.zero_grad(set_to_none=True)
    _forward_backward(model, ref, parts, settings)
    grads = {n: q.grad.double().norm().item() for n, q in model.named_parameters()}
    grad_vectors = {
        n: q.grad.flatten()[:: max(1, q.grad.numel() // 2000)].tolist() for n, q in model.named_parameters()
    }
    # per loss token, sorted by (tree, node, token): comparable across layouts
    order = np.lexsort(
        (
            np.concatenate([np.arange(p.loss_tokens) for p in packs]),
            np.concatenate([p.target_node for p in packs]),
            np.concatenate([[p.tree] * p.loss_tokens for p in packs]),
        )
    )
    flat = _in_pack_order(packs, batch, model) if args.check else np.zeros(0)
    optimizer = adamw(model.parameters(), lr=1e-6, weight_decay=0.0)  # tiny steps: the weights stay near
    work = {"learner": lambda: _learner_step(model, ref, parts, settings, optimizer)}
    if layout == "packed":
        work["bare"] = lambda: _bare_step(model, parts, optimizer)
    times = {name: [] for name in work}
    cpu = {name: [] for name in work}
    peaks = {name: [] for name in work}
    for _ in range(args.repeats):
        for name, step in work.items():  # interleaved: both see the same machine load
            model.zero_grad(set_to_none=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            with PeakRSS() as rss:
                step()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            peaks[name].append(rss.above_start)
    out = {
        "tokens": int(sum(len(p.input_ids) for p in packs)),
        "packs": len(packs),
        "forwards": len(parts),
        "logprobs": flat[order].tolist() if len(flat) else [],
        "grads": grads,
        "grad_vectors": grad_vectors,
    }
    for name, step in work.items():
        model.zero_grad(set_to_none=True)
        prefix = "" if name == "learner" else "bare_"
        out[f"{prefix}seconds"] = min(times[name])
        out[f"{prefix}cpu_seconds"] = min(cpu[name])
        out[f"{prefix}peak_mb"] = max(peaks[name])
        out[f"{prefix}tensor_peak_mb"] = _tensor_peak_mb(step)
    return out


def _learner_step(model, ref, parts, settings, optimizer) -> None:
    """The learner's work on one minibatch (update.policy_update's): the micro-batches' forward + backward,
    then the optimizer step (with the clipping when the settings have it)."""
    import torch

    _forward_backward(model, ref, parts, settings)
    if settings.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _bare_step(model, parts, optimizer) -> None:
    """The bare compute on the same rows: the model's plain causal forward over each micro-batch's packed rows
    (all positions' logits), the weighted cross-entropy of the same targets, backward; one AdamW step."""
    import torch

    for part in parts:
        logits = model(input_ids=part["input_ids"], use_cache=False).logits
        index = part["target_pos"][..., None].expand(-1, -1, logits.shape[-1])
        logprobs = torch.log_softmax(logits.gather(1, index), -1)
        picked = logprobs.gather(-1, part["target_ids"][..., None])[..., 0]
        (-(picked * part["loss_weight"]).sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
    """Sample the shape's trees, measure each layout in a fresh process, print the table; the JSON line."""
    prompts = args.paper_prompts if shape == "paper" else SHAPES[shape]["prompts"]
    layouts = [x for x in ("rows", "packed") if x in args.layouts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trees.pkl"
        sample(shape, prompts, path)
        flags = [
            *("--kl", str(args.kl), "--threads", str(args.threads), "--repeats", str(args.repeats)),
            *("--forward-tokens", str(args.forward_tokens), "--pack-tokens", str(args.pack_tokens)),
            *("--attention", args.attention, "--check" if args.check else "--no-check"),
        ]
        r = {}
        for layout in layouts:
            cmd = [sys.executable, "-m", "benchmarks.learner", "--measure", str(path), layout, *flags]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r[layout] = json.loads(out.strip().splitlines()[-1])
    print(
        f"\n{shape}: {SHAPES[shape]['branching']} x {SHAPES[shape]['step_tokens']} tokens, {prompts} "
        f"prompt(s), kl {args.kl}, {args.attention} attention, forward budget {args.forward_tokens} tokens, "
        f"pack budget {args.pack_tokens}"
    )
    print(
        "| layout | packs | forwards | tokens fed | seconds (step) | CPU seconds | peak RSS MB above start "
        "| peak tensor MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows_of_table = [(name, m, "") for name, m in r.items()]
    if "packed" in r:
        rows_of_table.append(("bare (packed rows)", r["packed"], "bare_"))
    for name, m, key in rows_of_table:
        print(
            f"| {name} | {m['packs']} | {m['forwards']} | {m['tokens']:,} | {m[key + 'seconds']:.2f} "
            f"| {m[key + 'cpu_seconds']:.2f} | {m[key + 'peak_mb']:.0f} | {m[key + 'tensor_peak_mb']:.0f} |"
        )
    line = {"shape": shape}
    if "packed" in r:
        line.update(_packed_keys(r["packed"]))
    if "rows" in r:
        line.update(_rows_keys(r["rows"], r.get("packed"), args))
    return line


def _packed_keys(packed: dict) -> dict:
    overhead = packed["cpu_seconds"] / max(packed["bare_cpu_seconds"], 1e-9)
    print(
        f"packed/bare: overhead {overhead:.3f} (CPU seconds; wall "
        f"{packed['seconds'] / max(packed['bare_seconds'], 1e-9):.3f}), peak memory "
        f"{packed['peak_mb'] / max(packed['bare_peak_mb'], 1):.3f} (RSS), "
        f"{packed['tensor_peak_mb'] / max(packed['bare_tensor_peak_mb'], 1):.3f} (tensors)"
    )
    keys = ("seconds", "cpu_seconds", "peak_mb", "tensor_peak_mb")
    return {
        "packed_tokens": packed["tokens"],
        **{f"packed_{k}": round(packed[k], 3) for k in keys},
        **{f"bare_{k}": round(packed[f"bare_{k}"], 3) for k in keys},
        "overhead": round(overhead, 3),
    }


def _rows_keys(rows: dict, packed: dict | None, args) -> dict:
    import numpy as np

    keys = ("seconds", "cpu_seconds", "peak_mb", "tensor_peak_mb")
    line = {"rows_tokens": rows["tokens"], **{f"rows_{k}": round(rows[k], 3) for k in keys}}
    if packed is None:
        return line
    diff = float("nan")
    if args.check:
        diff = float(np.abs(np.subtract(rows["logprobs"], packed["logprobs"])).max())
    rel = max(
        float(np.abs(np.subtract(rows["grad_vectors"][n], packed["grad_vectors"][n])).max())
        / max(rows["grads"][n], 1e-30)
        for n in rows["grads"]
    )
    print(
        f"packed/rows: tokens {packed['tokens'] / rows['tokens']:.3f}, seconds "
        f"{packed['seconds'] / rows['seconds']:.3f}, peak memory "
        f"{packed['peak_mb'] / max(rows['peak_mb'], 1):.3f} (RSS), "
        f"{packed['tensor_peak_mb'] / max(rows['tensor_peak_mb'], 1):.3f} (tensors); max |log-prob diff| "
        f"{diff:.2e}, max relative gradient diff {rel:.2e}"
    )
    return {**line, "max_logprob_diff": diff, "max_grad_rel_diff": rel}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper-prompts", type=int, default=1)
    p.add_argument("--kl", type=float, default=0.0, help="kl_coef: > 0 adds the reference model's forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--forward-tokens", type=int, default=16384)
    p.add_argument("--pack-tokens", type=int, default=8192)
    p.add_argument("--shapes", default="default,paper,grpo")
    p.add_argument("--layouts", default="rows,packed", help="rows,packed or packed (the overhead only)")
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
