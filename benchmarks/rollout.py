"""Rollout sharing: what a tree of reasoning steps costs against independent responses (GitHub issue #3).

Same tiny random model (tiny.py defaults), same 8 prompts (ArithmeticEnv problems 0-7):
  (a) tree sampling, branching [4, 4, 4], 16-token steps, EOS off: 64 full-length leaves per prompt;
  (b) the same number of leaves as independent 48-token responses (64 per prompt) in one batched call;
  (c) HF backend throughput at batch 64 against a bare forward/DynamicCache/multinomial loop, same shapes.
Prints the numbers and ends with one JSON line. Targets (checked and printed):
  tree_model_tokens <= 1.02 x tree_unique_tokens
  tree_seconds / flat_seconds <= 1.35 x tree_decode_tokens / flat_decode_tokens
  hf_tokens_per_s >= bare_tokens_per_s / 2

Run: .venv/bin/python -m benchmarks.rollout [--repeats 3] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import DynamicCache

from rllib_treerpo.core.tree import tree_metrics
from rllib_treerpo.generation import SamplingParams, make_backend
from rllib_treerpo.learner.precision import hardware_keys
from rllib_treerpo.models.tiny import build_char_tokenizer, build_tiny_model
from rllib_treerpo.sampling.sampler import sample_trees

BRANCHING, STEP_TOKENS, PROMPTS = [4, 4, 4], 16, 8


class _PromptEnv:
    """Fallback when envs/ (gymnasium) is not installed, e.g. on the GPU machine: prompt only, reward 0."""

    def __init__(self, prompt: str) -> None:
        self.prompt, self.answer, self.problem_id, self.response = prompt, "", "", ""
        self.stop_text, self.max_steps, self.steps = None, 1, 0

    def clone(self):
        new = _PromptEnv(self.prompt)
        new.response, new.steps = self.response, self.steps
        return new

    def step(self, text: str):
        self.response += text
        self.steps += 1
        return self.prompt + self.response, 0.0, False, self.steps >= self.max_steps, {}


def make_envs() -> list:
    try:
        from envs.arithmetic import ArithmeticEnv
    except ImportError:
        return [_PromptEnv(f"{i}+{i + 3}-{i + 1}=?\n") for i in range(PROMPTS)]
    out = []
    for i in range(PROMPTS):
        env = ArithmeticEnv(seed=0)
        env.reset(options={"problem_index": i})
        out.append(env)
    return out


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float, object]]:
    """Median wall and CPU seconds of each function over ``repeats`` rounds, and its last result.

    One warm-up call each, then the functions run interleaved (round-robin), so that load from other jobs on a
    shared machine hits them alike. CPU seconds (process time) are printed beside wall seconds: other jobs
    stretch the wall clock but, with one thread, hardly our own CPU time.
    """
    for fn in fns.values():
        fn()
    walls = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    timed.last_walls = walls  # per-round wall seconds, for paired ratios
    return {n: (statistics.median(walls[n]), statistics.median(cpus[n]), results[n]) for n in fns}


def compaction_sweep(tok, prompts: list[list[int]], device: str, dtype: str, repeats: int) -> None:
    """(d) compact_fraction with rows finishing early: 0 = compact at every finish, 1 = never (mask only)."""
    for eos_bias in (0.0, 1.5, 2.5):  # mean response length about 40, 20, 9 tokens of 48
        model = build_tiny_model(len(tok)).to(device=device, dtype=getattr(torch, dtype)).eval()
        bias = torch.zeros(len(tok), device=device, dtype=model.dtype)
        bias[tok.eos_token_id] = eos_bias
        model.lm_head.register_forward_hook(lambda _m, _i, out, b=bias: out + b)
        params = SamplingParams(max_new_tokens=48, seed=0)
        row = []
        for fraction in (0.0, 0.1, 0.25, 0.5, 1.0):
            backend = make_backend("hf", model, tok, compact_fraction=fraction)

            def run(backend=backend, params=params):
                backend.clear_cache()
                backend.reset_stats()
                backend.generate(prompts, 64, params)

            seconds = timed({"run": run}, repeats)["run"][0]
            row.append(f"{fraction}: {seconds:.3f} s")
        print(f"(d) EOS bias {eos_bias} ({backend.stats.decode_tokens} tokens): " + ", ".join(row))


def throughput(model, tok, backend, args) -> tuple[float, float, int]:
    """(c) Tokens/s at batch ``args.batch``: the hf backend against a bare decode loop on the same
    contexts."""
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(3, len(tok), (args.batch, 16), generator=g)
    new = 64
    tp_params = SamplingParams(max_new_tokens=new, stop_at_eos=False, seed=0)

    def run_hf():
        backend.clear_cache()
        backend.generate(contexts.tolist(), 1, tp_params)

    @torch.inference_mode()
    def run_bare():
        gen = torch.Generator(device=args.device).manual_seed(0)
        cache = DynamicCache()
        ids = contexts.to(args.device)
        for _ in range(new):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1, :]
            ids = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)

    runs = timed({"hf": run_hf, "bare": run_bare}, args.repeats)
    return args.batch * new / runs["hf"][0], args.batch * new / runs["bare"][0], new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads; 0 = all cores on an idle machine, 1 when other work loads it",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64, help="rows for the throughput comparison (c)")
    parser.add_argument(
        "--compaction", action="store_true", help="also time compact_fraction settings with early EOS (d)"
    )
    args = parser.parse_args()
    if args.threads <= 0:
        # Measured: on 2 busy cores, 2 OpenMP threads made a tiny-model step ~50x slower than 1 thread.
        cores = os.cpu_count() or 1
        args.threads = cores if os.getloadavg()[0] < 0.5 else max(1, cores - 1 - int(os.getloadavg()[0]))
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok)).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    envs = make_envs()
    prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in envs]
    backend = make_backend("hf", model, tok)

    # (a) tree: every level of all 8 trees in one generate call.
    def run_tree():
        backend.clear_cache()
        backend.reset_stats()
        trees = sample_trees(
            envs, backend, tok, branching=BRANCHING, step_tokens=STEP_TOKENS, stop_at_eos=False, seed=0
        )
        return trees, backend.stats.as_dict()

    # (b) flat: as many independent full-length responses (64 per prompt, 48 tokens), one batched call.
    per_prompt = BRANCHING[0] * BRANCHING[1] * BRANCHING[2]
    flat_params = SamplingParams(max_new_tokens=STEP_TOKENS * len(BRANCHING), stop_at_eos=False, seed=0)

    def run_flat():
        backend.clear_cache()
        backend.reset_stats()
        return backend.generate(prompts, per_prompt, flat_params), backend.stats.as_dict()

    runs = timed({"tree": run_tree, "flat": run_flat}, args.repeats)
    paired = statistics.median(
        t / f for t, f in zip(timed.last_walls["tree"], timed.last_walls["flat"], strict=True)
    )
    tree_seconds, tree_cpu, (trees, tree_stats_) = runs["tree"]
    flat_seconds, flat_cpu, (_, flat_stats) = runs["flat"]
    metrics = tree_metrics(trees)  # counts: printed as integers
    shape = {
        key: int(metrics[f"tree/{key}"]) for key in ("nodes", "leaves", "prompt_tokens", "generated_tokens")
    }

    hf_tps, bare_tps, new = throughput(model, tok, backend, args)

    names = (
        "shape",
        "tree_stats_",
        "flat_stats",
        "tree_seconds",
        "flat_seconds",
        "tree_cpu",
        "flat_cpu",
        "paired",
        "flat_params",
        "hf_tps",
        "bare_tps",
        "new",
    )
    local = locals()
    report(args, {name: local[name] for name in names})
    if args.compaction:
        compaction_sweep(tok, prompts, args.device, args.dtype, args.repeats)


def report(args, r: dict) -> None:
    """The table, the targets, and the JSON line, from the measurements ``r`` of main()."""
    shape, tree_stats_, flat_stats, flat_params = (
        r["shape"],
        r["tree_stats_"],
        r["flat_stats"],
        r["flat_params"],
    )
    tree_seconds, flat_seconds, tree_cpu, flat_cpu = (
        r["tree_seconds"],
        r["flat_seconds"],
        r["tree_cpu"],
        r["flat_cpu"],
    )
    paired, hf_tps, bare_tps, new = r["paired"], r["hf_tps"], r["bare_tps"], r["new"]
    n_leaves, tree_unique = shape["leaves"], shape["prompt_tokens"] + shape["generated_tokens"]
    per_prompt = BRANCHING[0] * BRANCHING[1] * BRANCHING[2]
    tree_dec, flat_dec = tree_stats_["decode_tokens"], flat_stats["decode_tokens"]
    print(f"device {args.device} {args.dtype}, threads {args.threads}, median of {args.repeats}")
    print(
        f"(a) tree {BRANCHING} x {STEP_TOKENS} tokens, {PROMPTS} prompts: nodes {shape['nodes']}, leaves "
        f"{n_leaves}, decode tokens {tree_dec}, tokens fed {tree_stats_['tokens_fed']} "
        f"(unique {tree_unique}, padding {tree_stats_['pad_tokens']}), {tree_seconds:.3f} s (cpu "
        f"{tree_cpu:.3f}) "
        f"(last round: generate calls {tree_stats_['seconds']:.3f} s, envs and tree building the rest)"
    )
    print(
        f"(b) flat {per_prompt} x {flat_params.max_new_tokens} tokens per prompt: decode tokens {flat_dec}, "
        f"tokens fed {flat_stats['tokens_fed']}, {flat_seconds:.3f} s (cpu {flat_cpu:.3f})"
    )
    token_ratio, time_ratio = tree_dec / flat_dec, tree_seconds / flat_seconds
    print(
        f"    tree/flat: decode tokens {token_ratio:.3f}, seconds {time_ratio:.3f} "
        f"(time per decode token x{time_ratio / token_ratio:.2f}; cpu seconds {tree_cpu / flat_cpu:.3f}, "
        f"x{tree_cpu / flat_cpu / token_ratio:.2f}; median of per-round ratios {paired:.3f}, "
        f"x{paired / token_ratio:.2f})"
    )
    print(
        f"(c) batch {args.batch} x {new} new tokens: hf backend {hf_tps:,.0f} tok/s, bare loop "
        f"{bare_tps:,.0f} tok/s (hf/bare {hf_tps / bare_tps:.2f})"
    )
    checks = {
        "tree_model_tokens <= 1.02 x tree_unique_tokens": tree_stats_["tokens_fed"] <= 1.02 * tree_unique,
        "tree/flat seconds <= 1.35 x tree/flat decode tokens": time_ratio <= 1.35 * token_ratio,
        "hf throughput within 2x of the bare loop": hf_tps >= bare_tps / 2,
    }
    for name, ok in checks.items():
        print(f"    target {'MET   ' if ok else 'MISSED'} {name}")
    print(
        json.dumps(
            {
                "tree_decode_tokens": tree_dec,
                "flat_decode_tokens": flat_dec,
                "tree_unique_tokens": tree_unique,
                "tree_model_tokens": tree_stats_["tokens_fed"],
                "tree_seconds": round(tree_seconds, 4),
                "flat_seconds": round(flat_seconds, 4),
                "hf_tokens_per_s": round(hf_tps, 1),
                "bare_tokens_per_s": round(bare_tps, 1),
                **hardware_keys(),
            }
        )
    )


if __name__ == "__main__":
    main()
