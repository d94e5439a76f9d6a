"""A Ray-free replica of the TreeRPO learner step, for questions that need many runs (docs/compare.md).

One iteration = what TreeRPO.training_step does, without Ray: ``sample_trees`` on P prompts of the env's train
split -> ``build_training_batch`` (tau, advantage normalisation) -> ``policy_loss`` on ``token_logprobs``,
AdamW (no weight decay), global grad-norm clip 1.0, optionally in several minibatches / epochs. With the
default variant it is GRPO as ``configs/tiny_arith_grpo.yaml`` runs it (it reproduces that run's numbers);
``tree`` switches to the difficulty's TreeRPO tree. It has no Ray dependency, so it runs on the lent GPU
machine, many variants at once.

    # one run: JSON lines (one per evaluation) on stdout
    python benchmarks/learner_replica.py run --model DIR --difficulty easy --variant tree --budget 300000
    # many runs in parallel, one JSON-lines file per run under --out
    python benchmarks/learner_replica.py sweep --models easy=DIR,hard=DIR --runs easy:base,easy:tree --seeds 2
    # the markdown table of a sweep
    python benchmarks/learner_replica.py table runs/replica/*.jsonl

Evaluation: the held-out test split, pass@1 = mean over 4 samples at T=1, greedy accuracy, response length.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIFFICULTIES = {  # the same tasks and tree shapes as benchmarks/_compare_lib.py
    "easy": {"env": {"num_ops": 3, "operand_min": 1, "operand_max": 9, "seed": 0}, "tokens": 48,
             "tree": {"branching": [3, 3, 3, 3], "step_tokens": 12, "delim": "\n"}},
    "hard": {"env": {"num_ops": 5, "operand_min": 1, "operand_max": 20, "seed": 0}, "tokens": 72,
             "tree": {"branching": [2] * 6, "step_tokens": 12, "delim": "\n"}},
}
BASE = dict(branching=[16], step_tokens=None, delim=None, lr=1e-4, opt="adamw", adv_std="group",
            agg="token_mean", kl=0.0, minibatches=1, epochs=1, adv_mode="normal", tau=0.1, prompts=32, warmup=0)
TREE = {"tree": True}
FIX = {"minibatches": 4, "lr": 3e-5}  # the recipe that kept greedy accuracy (docs/compare.md)
VARIANTS = {
    "base": {}, "lr3e-5": {"lr": 3e-5}, "lr1e-5": {"lr": 1e-5}, "pos_only": {"adv_mode": "pos"},
    "neg_only": {"adv_mode": "neg"}, "shuffled": {"adv_mode": "shuffle"}, "adv_none": {"adv_std": "none"},
    "seq_mean": {"agg": "seq_mean_token_mean"}, "kl0.1": {"kl": 0.1}, "mb4": {"minibatches": 4},
    "epochs2": {"epochs": 2}, "adam_b2_0.99": {"opt": "adamw_b2"}, "eps1e-4": {"opt": "adamw_eps"},
    "warmup10": {"warmup": 10}, "randsign": {"opt": "randsign"}, "big128": {"prompts": 128},
    "g4x128": {"branching": [4], "prompts": 128}, "mb4_lr3e-5": FIX,
    "tree": TREE, "tree_neg_only": {**TREE, "adv_mode": "neg"}, "tree_warmup10": {**TREE, "warmup": 10},
    # where might tree credit pay? (same recipe as GRPO's best, then tree shape / tau / batch)
    "tree_mb4_lr3e-5": {**TREE, **FIX}, "tree_tau0_mb4_lr3e-5": {**TREE, **FIX, "tau": 0.0},
    "tree_advnone_mb4_lr3e-5": {**TREE, **FIX, "adv_std": "none"},
    "tree_4x3_mb4_lr3e-5": {**FIX, "branching": [4, 4, 4], "step_tokens": "third", "delim": None},
    "tree_8x2_mb4_lr3e-5": {**FIX, "branching": [8, 8], "step_tokens": "half", "delim": None},
    "g4x128_mb4_lr3e-5": {**FIX, "branching": [4], "prompts": 128},
    "tree_p64_mb4_lr3e-5": {**TREE, **FIX, "prompts": 64},
    "mb4_lr1e-5": {"minibatches": 4, "lr": 1e-5}, "tree_mb4_lr1e-5": {**TREE, "minibatches": 4, "lr": 1e-5},
    "big128_mb4_lr3e-5": {**FIX, "prompts": 128},
}


def settings(difficulty: str, variant: str) -> dict:
    d = DIFFICULTIES[difficulty]
    v, own = dict(BASE), copy.deepcopy(VARIANTS[variant])
    if own.pop("tree", False):
        v.update(d["tree"])
    v.update(own)
    fractions = {None: 1, "half": 2, "third": 3}
    if v["step_tokens"] in fractions:
        v["step_tokens"] = d["tokens"] // fractions[v["step_tokens"]]
    return v


def evaluate_model(model, tok, test_env, max_tokens: int, problems: int) -> dict:
    from rllib_treerpo.evaluate import evaluate
    from rllib_treerpo.generation import make_backend

    s, _ = evaluate(test_env, make_backend("hf", model, tok), tok, num_problems=problems, samples=4,
                    max_new_tokens=max_tokens, temperature=1.0, seed=1234)
    return {"pass@1": s["pass@1"], "greedy": s["greedy_accuracy"], "len": s["mean_response_tokens"]}


def run(args) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.arithmetic import ArithmeticEnv
    from rllib_treerpo.batch import build_training_batch
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.losses import policy_loss, token_logprobs
    from rllib_treerpo.sampler import sample_trees

    torch.set_num_threads(1)
    v, d = settings(args.difficulty, args.variant), DIFFICULTIES[args.difficulty]
    v["prompts"] = args.prompts or v["prompts"]
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(dev).eval()
    ref = copy.deepcopy(model) if v["kl"] else None
    params = list(model.parameters())
    betas = (0.9, 0.99 if v["opt"] == "adamw_b2" else 0.999)
    opt = torch.optim.AdamW(params, lr=v["lr"], weight_decay=0.0, betas=betas,
                            eps=1e-4 if v["opt"] == "adamw_eps" else 1e-8)
    warm = v["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    env = ArithmeticEnv(**d["env"])
    test = ArithmeticEnv(**d["env"], split="test")
    rng = np.random.default_rng(args.seed)
    evals = sorted(float(x) for x in args.evals.split(",")) if args.evals else []
    tokens, it, prompts, t0, kept = 0.0, 0, 0, time.time(), []

    def report():
        row = {"difficulty": args.difficulty, "variant": args.variant, "seed": args.seed, "iter": it,
               "tokens": tokens, "prompts": prompts, "kept_groups": float(np.mean(kept)) if kept else None,
               "seconds": round(time.time() - t0, 1), **evaluate_model(model, tok, test, d["tokens"], args.problems)}
        print(json.dumps(row), flush=True)

    if args.eval_start:
        report()
    while (args.iters and it < args.iters) or (not args.iters and tokens < args.budget):
        roots = []
        for _ in range(v["prompts"]):
            e = env.clone()
            e.reset(seed=int(rng.integers(2**31)))
            roots.append(e)
        backend = make_backend("hf", model, tok)
        trees = sample_trees(roots, backend, tok, branching=v["branching"], step_tokens=v["step_tokens"],
                             step_delimiter=v["delim"], temperature=1.0, seed=int(rng.integers(2**31)))
        backend.clear_cache()
        rows, m = build_training_batch(trees, tau=v["tau"], advantage_std=v["adv_std"],
                                       value_estimate="child_mean", pad_id=0)
        tokens += m["tree/generated_tokens"]
        prompts += v["prompts"]
        kept.append(1.0 - m["tree/frac_groups_filtered"])
        it += 1
        if len(rows["input_ids"]):
            step(v, rows, model, ref, opt, sched, params, rng, dev, policy_loss, token_logprobs)
        due = [e for e in evals if tokens >= e]
        if due or (args.iters and it in {int(x) for x in evals}):
            evals = [e for e in evals if tokens < e]
            report()


def step(v, rows, model, ref, opt, sched, params, rng, dev, policy_loss, token_logprobs) -> None:
    """One learner update on a batch of rows (``minibatches`` x ``epochs`` optimizer steps)."""
    import numpy as np
    import torch

    adv = rows["advantages"]
    if v["adv_mode"] == "pos":
        adv = np.maximum(adv, 0)
    elif v["adv_mode"] == "neg":
        adv = np.minimum(adv, 0)
    elif v["adv_mode"] == "shuffle":  # control: GRPO's noise without its signal
        per_row = rng.permutation(adv.sum(1) / np.maximum(rows["loss_mask"].sum(1), 1))
        adv = per_row[:, None] * rows["loss_mask"]
    t = {k: torch.as_tensor(x, device=dev) for k, x in rows.items()}
    t["advantages"] = torch.as_tensor(adv, device=dev, dtype=torch.float32)
    model.train()
    for _ in range(v["epochs"]):
        for chunk in torch.randperm(len(rows["input_ids"])).chunk(v["minibatches"]):
            ids, mask = t["input_ids"][chunk], t["attention_mask"][chunk]
            logp = token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
            refp = None
            if ref is not None:
                with torch.no_grad():
                    refp = token_logprobs(ref(input_ids=ids, attention_mask=mask).logits, ids)
            loss, _ = policy_loss(logp, t["old_logprobs"][chunk], t["advantages"][chunk], t["loss_mask"][chunk],
                                  ref_logprobs=refp, kl_coef=v["kl"], loss_agg=v["agg"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if v["opt"] == "randsign":  # control: Adam's first-step size (lr per parameter), random directions
                with torch.no_grad():
                    for q in params:
                        q.add_((torch.randint(0, 2, q.shape, device=q.device).float() * 2 - 1) * v["lr"])
            else:
                opt.step()
                sched.step()
    model.eval()


def sweep(args) -> None:
    """Every (difficulty:variant, seed) as its own process, ``--parallel`` at a time."""
    models = dict(item.split("=", 1) for item in args.models.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for spec in args.runs.split(","):
        difficulty, variant = spec.split(":")
        settings(difficulty, variant)  # fail on a bad name before starting anything
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cmd = [sys.executable, __file__, "run", "--model", models[difficulty], "--difficulty", difficulty,
                   "--variant", variant, "--seed", str(seed), "--budget", str(args.budget), "--evals", args.evals,
                   "--iters", str(args.iters),
                   "--device", args.device, "--problems", str(args.problems), "--prompts", str(args.prompts)]
            if args.eval_start and seed == 0 and variant == "base":
                cmd.append("--eval-start")
            jobs.append((cmd, out / f"{difficulty}_{variant}_{seed}.jsonl"))
    running: list = []
    failed = []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            cmd, path = jobs.pop(0)
            running.append((subprocess.Popen(cmd, stdout=path.open("w"), stderr=path.with_suffix(".err").open("w")),
                            path))
        time.sleep(1)
        for p, path in list(running):
            if p.poll() is not None:
                running.remove((p, path))
                print(f"{path.name}: exit {p.returncode}", flush=True)
                if p.returncode:
                    failed.append(path.with_suffix(".err").name)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed, see {', '.join(failed)} in {out}")


def table(args) -> None:
    """Markdown table: the last evaluation of each run, mean ± std over seeds, per difficulty and variant."""
    import numpy as np

    runs: dict[tuple, list[dict]] = {}
    start: dict[str, dict] = {}
    for f in args.files:
        for line in Path(f).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r["tokens"] == 0:
                    start[r["difficulty"]] = r
                else:
                    runs.setdefault((r["difficulty"], r["variant"], r["seed"]), []).append(r)
    last: dict[tuple, list[dict]] = {}
    for (difficulty, variant, _), rows in runs.items():
        # the first evaluation at or past --at tokens (the last one without --at)
        at = [r for r in rows if args.at and r["tokens"] >= args.at]
        last.setdefault((difficulty, variant), []).append(at[0] if at else rows[-1])
    print("| task | variant | pass@1 (T=1) | greedy | tokens | prompts | iterations | kept groups | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for diff in sorted({k[0] for k in last}):
        if diff in start:
            s = start[diff]
            print(f"| {diff} | before RL | {s['pass@1']:.3f} | {s['greedy']:.3f} | 0 | 0 | 0 | | |")
        for (d, variant), rs in sorted(last.items(), key=lambda kv: kv[0]):
            if d != diff:
                continue
            def ms(key, rs=rs):
                x = np.array([r[key] for r in rs], dtype=float)
                return f"{x.mean():.3f} ± {x.std():.3f}"
            kept_values = [r["kept_groups"] for r in rs if r.get("kept_groups") is not None]
            kept = f"{np.mean(kept_values):.2f}" if kept_values else ""
            print(f"| {d} | {variant} | {ms('pass@1')} | {ms('greedy')} | {np.mean([r['tokens'] for r in rs]) / 1e3:.0f}k"
                  f" | {np.mean([r['prompts'] for r in rs]):.0f} | {np.mean([r['iter'] for r in rs]):.0f}"
                  f" | {kept} | {len(rs)} |")
    if args.plot:
        plot(runs, start, args.plot, args.variants)


def plot(runs: dict[tuple, list[dict]], start: dict[str, dict], path: str, variants: str | None) -> None:
    """One column per difficulty, rows pass@1 / greedy; one line per variant (mean over seeds, min-max shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keep = set(variants.split(",")) if variants else None
    diffs = sorted({k[0] for k in runs})
    fig, axes = plt.subplots(2, len(diffs), figsize=(6 * len(diffs), 7), squeeze=False)
    for col, diff in enumerate(diffs):
        names = sorted({k[1] for k in runs if k[0] == diff and (keep is None or k[1] in keep)})
        for name in names:
            seeds = [rows for (d, v, _), rows in runs.items() if d == diff and v == name]
            n = min(len(r) for r in seeds)
            zero = [start[diff]] if diff in start else []
            for row, metric in enumerate(("pass@1", "greedy")):
                x = np.mean([[r["tokens"] for r in zero + s[:n]] for s in seeds], axis=0) / 1e3
                y = np.array([[r[metric] for r in zero + s[:n]] for s in seeds])
                ax = axes[row][col]
                line, = ax.plot(x, y.mean(0), marker="o", ms=3, label=name)
                ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
                ax.set_title(f"{diff}: held-out {metric}")
                ax.set_xlabel("generated tokens (k)")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="easy")
    r.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--budget", type=float, default=300_000, help="generated tokens to train for")
    r.add_argument("--iters", type=int, default=0, help="train this many iterations instead of --budget")
    r.add_argument("--evals", default="100000,200000,300000",
                   help="comma-separated: generated tokens (or iterations with --iters) to evaluate at")
    r.add_argument("--eval-start", action="store_true", help="also evaluate before training")
    r.add_argument("--problems", type=int, default=200)
    r.add_argument("--device", default="cpu")
    r.add_argument("--prompts", type=int, default=0, help="prompts per iteration (default: the variant's)")
    s = sub.add_parser("sweep")
    s.add_argument("--models", required=True, help="difficulty=model_dir,...")
    s.add_argument("--runs", required=True, help="difficulty:variant,...")
    s.add_argument("--seeds", type=int, default=2)
    s.add_argument("--first-seed", type=int, default=0)
    s.add_argument("--budget", type=float, default=300_000)
    s.add_argument("--evals", default="100000,200000,300000")
    s.add_argument("--iters", type=int, default=0, help="iterations instead of --budget (--evals in iterations)")
    s.add_argument("--eval-start", action="store_true")
    s.add_argument("--problems", type=int, default=200)
    s.add_argument("--device", default="cpu")
    s.add_argument("--prompts", type=int, default=0, help="prompts per iteration (default: each variant's)")
    s.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    s.add_argument("--out", default="runs/replica")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.add_argument("--plot", help="also write held-out pass@1 and greedy accuracy against tokens to this PNG")
    t.add_argument("--variants", help="comma-separated variants to plot (default: all)")
    t.add_argument("--at", type=float, default=0, help="report the evaluation at this many generated tokens")
    args = p.parse_args()
    {"run": run, "sweep": sweep, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
