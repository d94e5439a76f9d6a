"""The vLLM backend's contract, against tests/fakes/fake_vllm.py (vLLM 0.32.0's classes, driven by a tiny real model).

What is checked: contexts, n, stops and seeds become the right vLLM requests; outputs become Samples with the right
finish reasons and log-probs equal to a fresh forward pass (base.py's convention); weights reach the engine as
tensors in its dtype and reset the prefix cache; sleep/wake around sampling and weight loads; a whole tree through
the sampler; and a missing vllm is one line naming the extra. The real engine: tests/rllib/test_vllm_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rllib_treerpo.generation import MissingExtraError, SamplingParams, get_backend_class
from rllib_treerpo.generation.vllm import VLLMBackend, finish_reason, request_seed, to_sample
from rllib_treerpo.models.tiny import build_char_tokenizer
from tests.fakes import fake_vllm
from tests.unit.test_generation import (
    PROMPTS,
    check_multi_token_delimiter,
    fresh_logprobs,
    fresh_logprobs_many,
    grow,
    ids,
    tiny_lm,
    token_id,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture
def fake(monkeypatch):
    fake_vllm.install(monkeypatch)
    yield fake_vllm
    fake_vllm.MODELS.clear()


def backend_for(model, tok, name="tiny", **kwargs) -> VLLMBackend:
    fake_vllm.register_model(name, model, tok)
    return get_backend_class("vllm").from_pretrained(name, tok, dtype="float32", **kwargs)


def test_engine_is_built_for_our_log_prob_convention(fake, tok):
    backend = backend_for(tiny_lm(tok), tok, gpu_memory_utilization=0.3, max_model_len=100, seed=7)
    llm = backend.llm
    assert llm.init_kwargs == {
        "dtype": "float32",
        "seed": 7,
        "gpu_memory_utilization": 0.3,
        "max_model_len": 100,
        "enable_prefix_caching": True,
        "enable_sleep_mode": False,
        "logprobs_mode": "processed_logprobs",
    }
    assert backend.max_length == 100
    raw = fake.LLM("tiny", dtype="float32")  # vLLM's default: raw_logprobs, taken before temperature
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMBackend(raw, tok)


def test_requests_carry_contexts_n_stops_and_seeds(fake, tok):
    backend = backend_for(tiny_lm(tok), tok)
    a, b = ids(tok, "3+4="), ids(tok, "12*7-1=")
    params = SamplingParams(max_new_tokens=5, temperature=0.8, stop_strings=("\n",), seed=11)
    out = backend.generate([a, b, a, b], [2, 0, 3, 1], params)
    assert [len(x) for x in out] == [2, 0, 3, 1]
    requests = backend.llm.requests[-1]
    assert [p["prompt_token_ids"] for p, _ in requests] == [a, a, b]  # the n=0 context is not sent
    for (_, sp), n in zip(requests, [2, 3, 1], strict=True):
        assert (sp.n, sp.max_tokens, sp.temperature, sp.logprobs) == (n, 5, 0.8, 0)
        assert sp.stop == ["\n"] and sp.stop_token_ids == [tok.eos_token_id] and not sp.ignore_eos
        assert sp.detokenize and not sp.skip_special_tokens and sp.top_k == 0 and sp.top_p == 1.0
    seeds = [sp.seed for _, sp in requests]
    assert seeds == [request_seed(11, a, 0), request_seed(11, a, 1), request_seed(11, b, 0)]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**62 for s in seeds)
    # Identical contexts in one call are different requests with different samples.
    assert out[0][0].token_ids != out[2][0].token_ids or out[0][1].token_ids != out[2][1].token_ids

    backend.generate([a], 1, SamplingParams(max_new_tokens=3, stop_at_eos=False))
    ((_, sp),) = backend.llm.requests[-1]
    assert sp.ignore_eos and sp.stop_token_ids == [] and sp.stop == [] and not sp.detokenize
    assert sp.seed is None


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_match_fresh_forward(fake, tok, temperature):
    model = tiny_lm(tok, bias={"\n": 2.0, "</s>": 1.0})
    backend = backend_for(model, tok)
    prompts = [ids(tok, p) for p in PROMPTS]

    def params(level):
        return SamplingParams(max_new_tokens=6, temperature=temperature, stop_strings=("\n",), seed=level)

    paths = grow(backend, prompts, 3, 2, params)
    refs = fresh_logprobs_many(model, [p[0] for p in paths], [len(prompts[p[2]]) for p in paths], temperature)
    for (seq, lps, root), ref in zip(paths, refs, strict=True):
        assert len(lps) == len(seq) - len(prompts[root])
        assert lps == pytest.approx(ref, abs=1e-4)


def test_greedy_logprobs_are_at_temperature_one(fake, tok):
    model = tiny_lm(tok)
    backend = backend_for(model, tok)
    prompts = [ids(tok, p) for p in PROMPTS]
    out = backend.generate(prompts, 2, SamplingParams(max_new_tokens=8, temperature=0))
    for prompt, (first, second) in zip(prompts, out, strict=True):
        assert first.token_ids == second.token_ids  # greedy
        assert first.logprobs == pytest.approx(
            fresh_logprobs(model, prompt + first.token_ids, len(prompt)), abs=1e-4
        )


def test_stops_eos_delimiter_length(fake, tok):
    eos, nl = tok.eos_token_id, token_id(tok, "\n")
    prompts = [ids(tok, p) for p in PROMPTS]
    out = backend_for(tiny_lm(tok, bias={"</s>": 4.0}), tok).generate(
        prompts, 4, SamplingParams(max_new_tokens=10, seed=0)
    )
    samples = [s for xs in out for s in xs]
    assert {s.finish_reason for s in samples} == {"eos", "length"}
    for s in samples:
        assert (s.finish_reason == "eos") == (s.token_ids[-1] == eos)  # the EOS token is kept, like hf.py
        assert eos not in s.token_ids[:-1]
        assert s.finish_reason == "eos" or len(s.token_ids) == 10
    out = backend_for(tiny_lm(tok, bias={"\n": 3.0}), tok, name="nl").generate(
        prompts, 4, SamplingParams(max_new_tokens=10, stop_strings=("\n",), seed=0)
    )
    samples = [s for xs in out for s in xs]
    assert any(s.finish_reason == "delimiter" for s in samples)
    for s in samples:
        assert (s.finish_reason == "delimiter") == (s.token_ids[-1] == nl)
        assert nl not in s.token_ids[:-1]


def test_multi_token_delimiter(fake, tok):
    """'ab' spans two tokens: the step ends at the 'b' that completes the first 'ab' (and keeps it)."""
    check_multi_token_delimiter(backend_for(tiny_lm(tok, bias={"a": 4.0, "b": 4.0}), tok), tok)


def test_finish_reason_mapping():
    def out(reason, stop):
        return fake_vllm.CompletionOutput(
            0, "", [5], None, [{5: fake_vllm.Logprob(-0.5)}], None, reason, stop
        )

    assert finish_reason(out("stop", None)) == "eos"  # the model's EOS
    assert finish_reason(out("stop", 7)) == "eos"  # a stop token id (e.g. a generation_config EOS)
    assert finish_reason(out("stop", "\n")) == "delimiter"
    assert finish_reason(out("length", None)) == "length"
    assert to_sample(out("stop", "\n")).logprobs == [-0.5]
    with pytest.raises(RuntimeError, match="abort"):
        finish_reason(out("abort", None))
    with pytest.raises(RuntimeError, match="logprobs=0"):
        to_sample(fake_vllm.CompletionOutput(0, "", [5], None, None, finish_reason="length"))


def test_seeds_follow_the_context_not_the_batch(fake, tok):
    backend = backend_for(tiny_lm(tok), tok)
    prompts = [ids(tok, p) for p in PROMPTS]

    def run(seed, contexts):
        out = backend.generate(contexts, 3, SamplingParams(max_new_tokens=8, seed=seed))
        return [[s.token_ids for s in xs] for xs in out]

    together = run(5, prompts)
    assert together == run(5, prompts)
    assert together != run(6, prompts)
    assert run(5, [prompts[2], prompts[0]]) == [together[2], together[0]]  # other batch, same samples


def test_top_k_top_p_and_hot_temperature_are_refused(fake, tok):
    backend = backend_for(tiny_lm(tok), tok)
    for params, match in [
        (SamplingParams(max_new_tokens=2, top_k=5), "top_k=5"),
        (SamplingParams(max_new_tokens=2, top_p=0.9), "top_p=0.9"),
        (SamplingParams(max_new_tokens=2, temperature=2.5), r"\[0, 2\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            backend.generate([ids(tok, "1+1")], 1, params)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        backend.generate([[5] * 125], 1, SamplingParams(max_new_tokens=4))


def test_load_weights_reaches_the_engine_and_resets_the_prefix_cache(fake, tok):
    model, other = tiny_lm(tok), tiny_lm(tok, seed=1)
    for m in (model, other):  # tiny_lm unties the head; say so, or vLLM (and the fake) skip lm_head.weight
        m.config.tie_word_embeddings = False
    backend = backend_for(model, tok)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    prompt = ids(tok, "a long prompt of 20 c")  # > one 16-token KV block
    first = backend.generate([prompt], 1, greedy)[0][0]
    cont = prompt + first.token_ids
    backend.reset_stats()
    backend.generate([cont], 1, greedy)
    assert backend.stats.cache_hits == 1  # the parent's blocks were cached

    calls = len(backend.llm.calls)
    backend.load_weights({k: v.to(torch.bfloat16) for k, v in other.state_dict().items()})
    assert [c[0] for c in backend.llm.calls[calls:]] == ["collective_rpc", "reset_prefix_cache"]
    assert backend.llm.calls[calls][1] == "reload_weights"
    assert {d for _, d in backend.llm.received_weights} == {torch.float32}  # cast to the engine's dtype
    backend.reset_stats()
    out = backend.generate([cont], 1, greedy)[0][0]
    assert backend.stats.cache_hits == 0 and backend.stats.cache_misses == 1
    ref = fresh_logprobs(other.to(torch.bfloat16).float(), cont + out.token_ids, len(cont))
    assert out.logprobs == pytest.approx(ref, abs=1e-4)


def test_sleep_after_sampling_wake_for_weights_and_sampling(fake, tok):
    model = tiny_lm(tok)
    backend = backend_for(model, tok, enable_sleep_mode=True)
    llm = backend.llm
    params = SamplingParams(max_new_tokens=4, seed=0)
    backend.generate([ids(tok, "1+2=")], 2, params)
    backend.release()
    backend.release()  # already asleep: nothing more
    assert [c for c in llm.calls if c[0] == "sleep"] == [("sleep", 1)] and llm.sleeping_tags == {
        "weights",
        "kv_cache",
    }
    mark = len(llm.calls)
    backend.load_weights(model.state_dict())
    assert llm.calls[mark:] == [
        ("wake_up", ("weights",)),
        ("collective_rpc", "reload_weights"),
        ("reset_prefix_cache", None),
    ]
    mark = len(llm.calls)
    backend.generate([ids(tok, "1+2=")], 2, params)
    assert llm.calls[mark:] == [("wake_up", ("kv_cache",)), ("generate", 1)]
    backend.release()
    mark = len(llm.calls)
    backend.generate([ids(tok, "1+2=")], 1, params)  # no weight load in between: wake everything
    assert llm.calls[mark:] == [("wake_up", ("weights", "kv_cache")), ("generate", 1)]

    plain = backend_for(model, tok, name="plain")  # no sleep mode: release only drops the prefix cache
    plain.release()
    assert plain.llm.calls == [("reset_prefix_cache", None)]


def test_a_tree_through_the_sampler(fake, tok):
    from rllib_treerpo.sampling.sampler import TreeSpec, grow_trees
    from tests.unit.test_sampler import check_structure, envs

    model = tiny_lm(tok, bias={"\n": 1.5, "</s>": 1.0})
    backend = backend_for(model, tok)
    spec = TreeSpec((3, 2, 2), step_tokens=5, step_delimiter="\n", temperature=0.9, seed=3)
    trees = grow_trees(envs(), backend, tok, spec)
    assert len(backend.llm.requests) <= 3  # one generate call per level
    first_level = backend.llm.requests[0]
    assert [sp.n for _, sp in first_level] == [3, 3, 3]
    for tree in trees:
        check_structure(tree, 3)
        for leaf in tree.leaves():
            path = [int(t) for t in tree.path_ids(leaf)]
            ref = fresh_logprobs(model, path, len(tree.prompt_ids), 0.9)
            recorded = [lp for i in tree.path(leaf) for lp in tree.nodes[i].logprobs]
            assert recorded == pytest.approx(ref, abs=1e-4)
    again = grow_trees(envs(), backend_for(model, tok, name="again"), tok, spec)

    def tokens(ts):
        return [[[int(x) for x in n.token_ids] for n in t.nodes] for t in ts]

    assert tokens(trees) == tokens(again)  # seeded: the same tree again


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch, tok):
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig

    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # as on a machine without vllm
    for call in (lambda: get_backend_class("vllm"), TreeRPOConfig().training(backend="vllm").preflight):
        with pytest.raises(MissingExtraError) as info:
            call()
        assert "\n" not in str(info.value) and 'pip install "rllib_treerpo[vllm]"' in str(info.value)
    assert (
        TreeRPOConfig.from_yaml(Path(__file__).parents[2] / "configs" / "gpu_1xH100_vllm.yaml").backend
        == "vllm"
    )  # a file still validates


def test_treerpo_trains_on_the_vllm_backend(fake, tiny_lm_dir, ray_session):
    """Config -> env runner -> vLLM engine -> trees -> learner -> weight sync, with sleep mode and TIS on."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from tests.rllib.test_algorithm import small_config

    config = small_config(
        tiny_lm_dir,
        backend="vllm",
        enable_sleep_mode=True,
        release_after_sampling=True,
        tis_cap=2.0,
        num_minibatches=1,
    )
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        backend = algo.env_runner.backend
        assert isinstance(backend, VLLMBackend) and backend.llm.init_kwargs["enable_sleep_mode"]
        calls = [c[0] for c in backend.llm.calls]
        last = len(calls) - calls[::-1].index("generate")
        # after the last level: drop the tree's prefixes, sleep for the learner, wake the weights for the sync
        assert calls[last:] == [
            "reset_prefix_cache",
            "sleep",
            "wake_up",
            "collective_rpc",
            "reset_prefix_cache",
        ]
        assert ("wake_up", ("kv_cache",)) in backend.llm.calls  # the second iteration woke the KV cache
        learner = result["learners"][DEFAULT_MODULE_ID]
        assert learner["loss/logprob_mismatch"] < 1e-4  # the fake computes in fp32 like the learner
        assert learner["loss/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert result["tree/trees"] == 2
        assert "rl_module" not in algo.env_runner.get_state()  # the engine's weights are not exported
    finally:
        algo.stop()


def test_train_cli_without_vllm_stops_in_one_line_before_ray_or_a_model(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # wherever these tests run, vllm is absent for this command
        "from rllib_treerpo.jobs.cli import main\n"
        f"rc = main(['train', {str(root / 'configs' / 'gpu_1xH100_vllm.yaml')!r}, '--output', {str(out)!r}])\n"
        "import ray; print(rc, ray.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("treerpo: error:")]
    assert len(error) == 1 and 'pip install "rllib_treerpo[vllm]"' in error[0]
    assert not out.exists()


def test_vllm_check_helpers_agree_on_one_model(fake, tmp_path):
    """benchmarks/vllm_check.py's tree, comparison and teacher forcing, on the fake engine and the CPU (fp32)."""
    from benchmarks.vllm_check import PROMPTS as CHECK_PROMPTS
    from benchmarks.vllm_check import build_model_folder, compare, grow, teacher_forced
    from rllib_treerpo.generation.hf import HFBackend
    from rllib_treerpo.models.model_io import load_tokenizer

    folder = build_model_folder(tmp_path / "m", "tiny")
    tok = load_tokenizer(folder)
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in CHECK_PROMPTS[:3]]
    vllm = VLLMBackend.from_pretrained(folder, tok, dtype="float32")
    hf = HFBackend.from_pretrained(folder, tok, dtype="float32")
    paths_v, _ = grow(vllm, contexts, [2, 2], 4)
    paths_h, _ = grow(hf, contexts, [2, 2], 4)
    assert len(paths_v) == 12 and all(len(t) == 8 for _, t, _ in paths_v)
    greedy = compare(paths_v, paths_h)
    assert greedy["compared_fraction"] == 1.0 and greedy["max_abs_diff"] < 1e-4
    assert teacher_forced(hf.model, contexts, paths_v)["max_abs_diff"] < 1e-4
