"""The real vLLM engine (marker ``vllm``): skipped unless the vllm package and a CUDA GPU are both present.

NEVER RUN where this was written (no vLLM, no GPU there). On a GPU machine with the vllm extra (docs/vllm.md):

    pytest -m vllm tests/rllib/test_vllm_gpu.py

1. The same greedy tree with ``hf`` and ``vllm`` (bf16, a random tiny Qwen2 with head_dim 64): at identical tokens
   the log-probs agree (mean |diff| <= 1e-2, max <= 5e-2: bf16 rounding of logits of a few units alone reaches
   ~1e-2 at the worst token), and vLLM's log-probs match a fresh transformers forward, the learner's computation.
2. TreeRPO trains iterations with the vllm backend (local env runner, sleep mode on): trees, a learner update,
   the weight sync into the engine, and a small sampler/learner log-prob mismatch.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
        reason='needs the vllm package (pip install "rllib_treerpo[vllm]") and a CUDA GPU',
    ),
]

BRANCHING, STEP_TOKENS = [2, 2, 2], 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from benchmarks.vllm_check import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("vllm_tiny"), "tiny")


def test_greedy_tree_hf_and_vllm_agree(model_dir):
    from benchmarks.vllm_check import PROMPTS, compare, grow, shutdown, teacher_forced
    from rllib_treerpo.generation.hf import HFBackend
    from rllib_treerpo.generation.vllm import VLLMBackend
    from rllib_treerpo.models.model_io import load_tokenizer

    tok = load_tokenizer(model_dir)
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    vllm = VLLMBackend.from_pretrained(
        model_dir,
        tok,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=512,
        enable_sleep_mode=True,
        enforce_eager=True,
    )
    try:
        paths_v, _ = grow(vllm, contexts, BRANCHING, STEP_TOKENS)
        check_cache_sleep_and_weights(vllm, contexts[0] * 20, model_dir)
    finally:
        shutdown(vllm)
    hf = HFBackend.from_pretrained(model_dir, tok, dtype="bfloat16", device="cuda")
    paths_h, _ = grow(hf, contexts, BRANCHING, STEP_TOKENS)
    greedy = compare(paths_v, paths_h)
    assert greedy["compared_fraction"] >= 0.5, greedy
    assert greedy["mean_abs_diff"] <= 1e-2 and greedy["max_abs_diff"] <= 5e-2, greedy
    forced = teacher_forced(hf.model, contexts, paths_v)
    assert forced["mean_abs_diff"] <= 1e-2 and forced["max_abs_diff"] <= 5e-2, forced


def check_cache_sleep_and_weights(vllm, long: list[int], model_dir: str) -> None:
    """A continuation hits the prefix cache; sleep, a weight load (the same weights) and wake leave the output
    unchanged and the prefix cache empty."""
    from transformers import AutoModelForCausalLM

    from rllib_treerpo.generation import SamplingParams

    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    cont = long + vllm.generate([long], 1, greedy)[0][0].token_ids
    vllm.reset_stats()
    before = vllm.generate([cont], 1, greedy)[0][0]
    assert vllm.stats.cache_hits == 1  # the first call's full KV blocks
    vllm.release()  # sleeps (sleep mode)
    weights = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    vllm.load_weights(weights)  # wakes the weights, reload_weights, reset_prefix_cache
    vllm.reset_stats()
    after = vllm.generate([cont], 1, greedy)[0][0]  # wakes the KV cache
    assert vllm.stats.cache_hits == 0 and vllm.stats.cache_misses == 1
    assert after.token_ids == before.token_ids
    assert after.logprobs == pytest.approx(before.logprobs, abs=1e-3)


def test_treerpo_trains_with_the_vllm_backend(model_dir):
    ray = pytest.importorskip("ray")
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_treerpo.generation.vllm import VLLMBackend
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig

    config = TreeRPOConfig.from_yaml(
        None,
        {
            "model_name_or_path": model_dir,
            "dtype": "bfloat16",
            "backend": "vllm",
            "gpu_memory_utilization": 0.3,
            "max_model_len": 512,
            "enable_sleep_mode": True,
            "release_after_sampling": True,
            "branching": [2, 2],
            "step_tokens": 8,
            "prompts_per_iteration": 4,
            "tau": 0.0,
            "lr": 1e-4,
            "env_config": {"num_ops": 1},
            "seed": 0,
            "num_env_runners": 0,  # the local env runner: the engine lives in this process
            "num_learners": 0,
            "num_gpus_per_learner": 1,  # the local learner on the same GPU
        },
    )
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        assert isinstance(algo.env_runner.backend, VLLMBackend)
        assert result["tree/trees"] == 4 and result["loss/optimizer_steps"] == 1
        learner = result["learners"][DEFAULT_MODULE_ID]
        assert learner["loss/logprob_mismatch"] < 5e-2  # bf16 vLLM vs the bf16 learner
    finally:
        algo.stop()
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        gc.collect()
        cleanup_dist_env_and_memory()
