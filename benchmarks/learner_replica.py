"""A Ray-free driver of TreeRPO's iteration core, for questions that need many runs (GPU machines have no
Ray).

One iteration is exactly what TreeRPO.training_step does, through the same functions: ``sample_iteration``
(sampler.py, the env runner's seeds), ``build_training_batch`` (rows.py), and ``policy_update`` (update.py:
the minibatch plan the algorithm uses, compute_loss, AdamW with weight_decay, global-norm clipping) on a
config of benchmarks/compare_lib.py (an algorithm's YAML + a difficulty + --set overrides).
tests/unit/test_iteration.py checks that an update here and one through RLlib's learner give the same
parameters.

    # one run: JSON lines (one per evaluation) on stdout
    python -m benchmarks.learner_replica run --algorithm TreeRPO --difficulty easy --budget 300000 \\
        --device cuda
    # many runs in parallel, one JSON-lines file per (label, seed) under --out
    python -m benchmarks.learner_replica sweep --runs easy:TreeRPO,easy:GRPO --set "TreeRPO:tau=0" --seeds 3
    # the markdown table (and plot) of a sweep
    python -m benchmarks.learner_replica table runs/replica/*.jsonl --plot curves.png

Evaluation: the held-out test split, pass@1 = mean over --samples samples at T=1, greedy accuracy, response
length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import compare_lib as lib
from rllib_treerpo.learner.precision import hardware_keys


class Replica:
    """One training run without Ray: the policy, its optimizer and reference, the train and held-out envs."""

    def __init__(self, args) -> None:

        from envs import make_reasoning_env
        from rllib_treerpo.generation import make_backend
        from rllib_treerpo.learner.update import UpdateSettings, adamw
        from rllib_treerpo.models.model_io import load_causal_lm, load_tokenizer
        from rllib_treerpo.sampling.evaluation import Evaluator

        model_path = args.model or lib.warm_model(args.difficulty, lib.parse_sets(args.set).get("*", {}))
        c, job, _ = lib.run_config(args.algorithm, args.difficulty, _overrides(args), model_path, args.seed)
        self.config, self.tok = c, load_tokenizer(model_path)
        self.model = load_causal_lm(model_path, c.dtype).to(args.device).eval()
        self.ref = load_causal_lm(model_path, c.dtype).to(args.device).eval() if c.kl_coef > 0 else None
        self.optimizer = adamw(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.backend = make_backend("hf", self.model, self.tok)  # samples with the weights being trained
        self.env = make_reasoning_env(c.env, c.env_config)
        test = make_reasoning_env(c.env, {**c.env_config, **job.eval_env_config}, field="eval_env_config")
        self.evaluate = Evaluator(
            test,
            self.backend,
            self.tok,
            problems=args.problems,
            samples=args.samples,
            max_new_tokens=c.tree_spec().response_tokens,
            seed=1234,
        )
        self.spec = c.tree_spec()
        self.update_settings = UpdateSettings.from_config(c)

    def iteration(self, it: int) -> dict[str, float]:
        """Iteration ``it`` as TreeRPO.training_step runs it with num_env_runners=0; returns the tree
        metrics."""
        from rllib_treerpo.learner.batches import minibatch_seed
        from rllib_treerpo.learner.rows import PackSettings, build_training_batch
        from rllib_treerpo.learner.update import policy_update
        from rllib_treerpo.models.model_io import pad_token_id
        from rllib_treerpo.sampling.sampler import sample_iteration, sampling_seed

        c = self.config
        trees = sample_iteration(
            self.env, self.backend, self.tok, self.spec, c.prompts_per_iteration, sampling_seed(c.seed, 0, it)
        )
        packs, metrics = build_training_batch(trees, PackSettings.from_config(c))
        if packs:
            policy_update(
                self.model,
                self.optimizer,
                packs,
                self.update_settings,
                pad_id=pad_token_id(self.tok),
                seed=minibatch_seed(c.seed, it),
                ref_model=self.ref,
            )
            self.backend.clear_cache()  # its K/V were computed with the old weights
        return metrics


def run(args) -> None:
    """Train one (difficulty, algorithm, seed) for --budget generated tokens (or --iters), evaluating on the
    way."""
    import torch

    torch.set_num_threads(1)
    replica = Replica(args)
    evals = sorted(float(x) for x in args.evals.split(",")) if args.evals else []
    tokens, it, prompts, t0, kept = 0.0, 0, 0, time.time(), []

    def report() -> None:
        summary, _ = replica.evaluate()
        row = {
            "label": args.label or args.algorithm,
            "difficulty": args.difficulty,
            "seed": args.seed,
            "iter": it,
            "tokens": tokens,
            "prompts": prompts,
            "kept_groups": sum(kept) / len(kept) if kept else None,
            "seconds": round(time.time() - t0, 1),
            "pass@1": summary["pass@1"],
            "greedy": summary["greedy_accuracy"],
            "len": summary["mean_response_tokens"],
        }
        print(json.dumps({**row, **hardware_keys()}), flush=True)

    if args.eval_start:
        report()
    while (args.iters and it < args.iters) or (not args.iters and tokens < args.budget):
        metrics = replica.iteration(it)
        tokens += metrics["tree/generated_tokens"]
        prompts += int(metrics["tree/trees"])
        kept.append(1.0 - metrics["tree/frac_groups_filtered"])
        it += 1
        due = [e for e in evals if (it if args.iters else tokens) >= e]
        if due:
            evals = [e for e in evals if e not in due]
            report()


def _overrides(args) -> dict:
    sets = lib.parse_sets(args.set)
    return {**sets.get("*", {}), **sets.get(args.algorithm, {})}


def sweep(args) -> None:
    """Every (difficulty:algorithm, seed) as its own process, ``--parallel`` at a time."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for item in args.runs.split(","):
        difficulty, _, algorithm = item.partition(":")
        if difficulty not in lib.DIFFICULTIES or algorithm not in ("TreeRPO", "GRPO"):
            raise SystemExit(
                f"--runs {item!r}: expected DIFFICULTY:ALGORITHM with {sorted(lib.DIFFICULTIES)} and "
                "TreeRPO or GRPO"
            )
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.learner_replica",
                "run",
                "--difficulty",
                difficulty,
                "--algorithm",
                algorithm,
                "--seed",
                str(seed),
                "--budget",
                str(args.budget),
                "--evals",
                args.evals,
                "--iters",
                str(args.iters),
                "--device",
                args.device,
                "--problems",
                str(args.problems),
                "--samples",
                str(args.samples),
                "--label",
                args.label or algorithm,
            ]
            cmd += [x for s in args.set for x in ("--set", s)] + (
                ["--model", args.model] if args.model else []
            )
            if args.eval_start and seed == args.first_seed:
                cmd.append("--eval-start")
            jobs.append((cmd, out / f"{difficulty}_{args.label or algorithm}_{seed}.jsonl"))
    running, failed = [], []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            cmd, path = jobs.pop(0)
            running.append(
                (
                    subprocess.Popen(cmd, stdout=path.open("w"), stderr=path.with_suffix(".err").open("w")),
                    path,
                )
            )
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
    """Markdown table: the evaluation at --at tokens (else the last) of each run, mean ± std over seeds."""
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
                    runs.setdefault((r["difficulty"], r["label"], r["seed"]), []).append(r)
    picked: dict[tuple, list[dict]] = {}
    for (difficulty, label, _), rows in runs.items():
        at = [r for r in rows if args.at and r["tokens"] >= args.at]
        picked.setdefault((difficulty, label), []).append(at[0] if at else rows[-1])
    print("| task | run | pass@1 (T=1) | greedy | tokens | prompts | iterations | kept groups | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (difficulty, label), rs in sorted(picked.items()):
        if difficulty in start and label == min(k[1] for k in picked if k[0] == difficulty):
            s = start[difficulty]
            print(f"| {difficulty} | before RL | {s['pass@1']:.3f} | {s['greedy']:.3f} | 0 | 0 | 0 | | |")

        def ms(key: str, rs=rs) -> str:
            x = np.array([r[key] for r in rs], dtype=float)
            return f"{x.mean():.3f} ± {x.std():.3f}"

        kept = [r["kept_groups"] for r in rs if r.get("kept_groups") is not None]
        print(
            f"| {difficulty} | {label} | {ms('pass@1')} | {ms('greedy')} | "
            f"{np.mean([r['tokens'] for r in rs]) / 1e3:.0f}k | {np.mean([r['prompts'] for r in rs]):.0f} | "
            f"{np.mean([r['iter'] for r in rs]):.0f} | {f'{np.mean(kept):.2f}' if kept else ''} | {len(rs)} |"
        )
    if args.plot:
        curves: dict[str, list[dict]] = {}
        for (difficulty, label, _), rows in sorted(runs.items()):
            zero = [{**start[difficulty], "tokens": 0.0, "prompts": 0.0}] if difficulty in start else []
            points = [{**r, "response_tokens": r["len"]} for r in zero + rows]
            curves.setdefault(f"{difficulty}:{label}", []).append({"points": points})
        lib.plot_curves(curves, "learner replica", Path(args.plot))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "sweep"):
        r = sub.add_parser(name)
        r.add_argument("--model", help="start from this model folder (default: the difficulty's warm start)")
        r.add_argument("--difficulty", choices=sorted(lib.DIFFICULTIES), default="easy")
        r.add_argument("--set", action="append", default=[], metavar="[ALGO:]FIELD=VALUE")
        r.add_argument("--budget", type=float, default=300_000, help="generated tokens to train for")
        r.add_argument("--iters", type=int, default=0, help="train this many iterations instead of --budget")
        r.add_argument(
            "--evals",
            default="100000,200000,300000",
            help="comma-separated: generated tokens (or iterations with --iters) to evaluate at",
        )
        r.add_argument("--eval-start", action="store_true", help="also evaluate before training")
        r.add_argument("--problems", type=int, default=200)
        r.add_argument("--samples", type=int, default=4)
        r.add_argument("--device", default="cpu")
        r.add_argument("--label", help="name of the run in the output (default: the algorithm)")
    run_p, sweep_p = sub.choices["run"], sub.choices["sweep"]
    run_p.add_argument("--algorithm", choices=("TreeRPO", "GRPO"), default="TreeRPO")
    run_p.add_argument("--seed", type=int, default=0)
    sweep_p.add_argument("--runs", required=True, help="DIFFICULTY:ALGORITHM,...")
    sweep_p.add_argument("--seeds", type=int, default=2)
    sweep_p.add_argument("--first-seed", type=int, default=0)
    sweep_p.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    sweep_p.add_argument("--out", default="runs/replica")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.add_argument("--plot", help="also write held-out pass@1 and greedy accuracy against tokens to this PNG")
    t.add_argument("--at", type=float, default=0, help="report the evaluation at this many generated tokens")
    args = p.parse_args(argv)
    {"run": run, "sweep": sweep, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
