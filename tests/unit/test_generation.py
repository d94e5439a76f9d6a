"""The generation interface and the transformers backend: cached branching must equal fresh sampling."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rllib_treerpo.generation import (
    GenerationBackend,
    MissingExtraError,
    SamplingParams,
    get_backend_class,
    make_backend,
)
from rllib_treerpo.models.tiny import build_char_tokenizer, build_tiny_model

WINDOW = 128


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny_lm(tok, bias: dict[str, float] | None = None, seed: int = 0):
    """A small random Qwen2 with an untied, large-scale head: greedy output varies instead of repeating.

    ``bias`` adds a constant to some tokens' logits (a forward hook on lm_head), to make EOS or a delimiter
    likely; the fresh reference forwards go through the same hook.
    """
    model = build_tiny_model(
        len(tok),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_positions=WINDOW,
        seed=seed,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(len(tok), 32, generator=g) * 0.5)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0, generator=g)
    if bias:
        vec = torch.zeros(len(tok))
        for text, value in bias.items():
            vec[token_id(tok, text)] = value
        model.lm_head.register_forward_hook(lambda _m, _i, out: out + vec)
    return model


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def token_id(tok, text: str) -> int:
    """The id of a one-token text ("\n", "a", "</s>"); the char tokenizer names "\n" "Ċ", so encode it."""
    (only,) = ids(tok, text)
    return only


PROMPTS = ["3+4=", "12*7-1=", "Q: 9-2 ", "ab"]


def fresh_logprobs(model, seq: list[int], start: int, temperature: float = 1.0) -> list[float]:
    """log_softmax(logits / T) of seq[start:] from one fresh full forward (no cache, no padding)."""
    return fresh_logprobs_many(model, [seq], [start], temperature)[0]


def fresh_logprobs_many(model, seqs: list[list[int]], starts: list[int], temperature: float = 1.0):
    """fresh_logprobs of several sequences in one forward: right padding never reaches a causal position."""
    width = max(map(len, seqs))
    batch = torch.tensor([seq + [0] * (width - len(seq)) for seq in seqs])
    with torch.inference_mode():
        logp = torch.log_softmax(model(batch).logits.float() / temperature, dim=-1)
    return [
        [logp[b, t - 1, seq[t]].item() for t in range(start, len(seq))]
        for b, (seq, start) in enumerate(zip(seqs, starts, strict=True))
    ]


def grow(backend, contexts, levels: int, n: int, params_for) -> list[tuple[list[int], list[float], int]]:
    """Branch ``levels`` times from ``contexts`` (level k+1 continues the returned samples of level k).

    Returns (full sequence, all new log-probs, index of the root context) per final sample.
    """
    paths = [(list(c), [], i) for i, c in enumerate(contexts)]
    for level in range(levels):
        out = backend.generate([p[0] for p in paths], n, params_for(level))
        paths = [
            (seq + s.token_ids, lps + s.logprobs, root)
            for (seq, lps, root), samples in zip(paths, out, strict=True)
            for s in samples
        ]
    return paths


def test_greedy_cached_branching_equals_fresh(tok):
    model = tiny_lm(tok)
    prompts = [ids(tok, p) for p in PROMPTS]
    cached = make_backend("hf", model, tok)
    paths = grow(cached, prompts, 3, 2, lambda _: SamplingParams(max_new_tokens=5, temperature=0))
    assert cached.stats.cache_hits > 0
    fresh = make_backend("hf", model, tok, cache_prefixes=False)
    refs = fresh.generate(prompts, 1, SamplingParams(max_new_tokens=15, temperature=0))
    forward = fresh_logprobs_many(model, [x[0] for x in paths], [len(prompts[x[2]]) for x in paths])
    assert [x[2] for x in paths] == [p for p in range(len(prompts)) for _ in range(8)]
    for (seq, lps, p), lps_forward in zip(paths, forward, strict=True):
        ref = refs[p][0]  # greedy: all 8 branches of a prompt are the same continuation
        assert seq[len(prompts[p]) :] == ref.token_ids
        assert lps == pytest.approx(ref.logprobs, abs=1e-4)
        assert lps == pytest.approx(lps_forward, abs=1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.6, 0, 0.9)])
def test_logprobs_match_fresh_forward(tok, temperature, top_k, top_p):
    model = tiny_lm(tok, bias={"\n": 2.0, "</s>": 1.0})
    backend = make_backend("hf", model, tok)
    prompts = [ids(tok, p) for p in PROMPTS]

    def params(level):
        return SamplingParams(
            max_new_tokens=6,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_strings=("\n",),
            seed=level,
        )

    paths = grow(backend, prompts, 3, 2, params)
    assert backend.stats.cache_hits > 0
    refs = fresh_logprobs_many(model, [p[0] for p in paths], [len(prompts[p[2]]) for p in paths], temperature)
    for (seq, lps, root), ref in zip(paths, refs, strict=True):
        assert len(lps) == len(seq) - len(prompts[root])
        assert lps == pytest.approx(ref, abs=1e-4)


def test_tokens_fed_second_level_feeds_only_new_tokens(tok):
    model = tiny_lm(tok)
    backend = make_backend("hf", model, tok)
    prompts = [ids(tok, p) for p in PROMPTS]
    first = backend.generate(prompts, 3, SamplingParams(max_new_tokens=4, seed=1))
    s = backend.stats
    new = [x for samples in first for x in samples]
    assert s.prefill_tokens == sum(map(len, prompts))  # each prompt once, not once per sample
    assert s.decode_tokens == sum(len(x.token_ids) for x in new)
    # A sample's last token is never fed in its own call.
    assert s.tokens_fed == s.prefill_tokens + sum(len(x.token_ids) - 1 for x in new)
    contexts = list({tuple(p + x.token_ids): None for p, xs in zip(prompts, first, strict=True) for x in xs})
    backend.reset_stats()
    second = backend.generate([list(c) for c in contexts], 2, SamplingParams(max_new_tokens=4, seed=2))
    s = backend.stats
    assert s.cache_hits == len(contexts) and s.cache_misses == 0
    assert s.prefill_tokens == len(contexts)  # only each context's last (not yet cached) token
    assert s.tokens_fed == len(contexts) + sum(len(x.token_ids) - 1 for xs in second for x in xs)


def test_mixed_hits_misses_and_duplicates(tok):
    """Cached contexts, new prompts and a duplicate in one call: the holes between cache and tail are
    masked."""
    model = tiny_lm(tok)
    backend = make_backend("hf", model, tok)
    greedy = SamplingParams(max_new_tokens=5, temperature=0)
    first = backend.generate([ids(tok, "7*7=")], 1, greedy)[0][0]
    cont = ids(tok, "7*7=") + first.token_ids
    contexts = [cont, ids(tok, "a longer prompt here"), cont, cont + ids(tok, "xy")]  # last: prefix hit
    backend.reset_stats()
    out = backend.generate(contexts, [1, 2, 1, 1], greedy)
    assert [len(x) for x in out] == [1, 2, 1, 1]
    assert backend.stats.cache_hits == 2 and backend.stats.cache_misses == 1  # 3 unique contexts
    fresh = make_backend("hf", model, tok, cache_prefixes=False)
    for ctx, samples in zip(contexts, out, strict=True):
        ref = fresh.generate([ctx], 1, greedy)[0][0]
        for s in samples:
            assert s.token_ids == ref.token_ids
            assert s.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    # Continue every sample: their kept caches have holes (the "xy" row) and different left pads.
    nexts = [ctx + s.token_ids for ctx, samples in zip(contexts, out, strict=True) for s in samples]
    backend.reset_stats()
    again = backend.generate(nexts, 1, greedy)
    assert backend.stats.cache_misses == 0 and backend.stats.prefill_tokens == backend.stats.cache_hits
    refs = fresh.generate(nexts, 1, greedy)
    for mine, ref in zip(again, refs, strict=True):
        assert mine[0].token_ids == ref[0].token_ids
        assert mine[0].logprobs == pytest.approx(ref[0].logprobs, abs=1e-4)


def test_compaction_does_not_change_samples(tok):
    """Greedy (compaction changes how many random numbers a step draws, so sampled streams may differ)."""
    model = tiny_lm(tok, bias={"</s>": 2.5})
    prompts = [ids(tok, p) for p in PROMPTS + ["1", "22+", "(3)", "x=y", "0-0-0-"]]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    runs = []
    for fraction in (0.0, 0.5, 1.0):
        backend = make_backend("hf", model, tok, compact_fraction=fraction)
        runs.append(grow(backend, prompts, 2, 2, lambda _: params))
    lengths = {len(seq) - len(prompts[root]) for seq, _, root in runs[0]}
    assert len(lengths) > 2  # rows did finish at different steps
    for other in runs[1:]:
        for (seq_a, lp_a, _), (seq_b, lp_b, _) in zip(runs[0], other, strict=True):
            assert seq_a == seq_b
            assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_stops_eos_delimiter_length(tok):
    eos, nl = tok.eos_token_id, token_id(tok, "\n")
    prompts = [ids(tok, p) for p in PROMPTS]
    out = make_backend("hf", tiny_lm(tok, bias={"</s>": 4.0}), tok).generate(
        prompts, 4, SamplingParams(max_new_tokens=10, seed=0)
    )
    samples = [s for xs in out for s in xs]
    assert any(s.finish_reason == "eos" for s in samples)
    for s in samples:
        assert (s.finish_reason == "eos") == (s.token_ids[-1] == eos)
        assert eos not in s.token_ids[:-1]
        assert s.finish_reason == "eos" or len(s.token_ids) == 10
    # EOS disabled: every sample runs to the length limit, EOS tokens included.
    out = make_backend("hf", tiny_lm(tok, bias={"</s>": 4.0}), tok).generate(
        prompts, 2, SamplingParams(max_new_tokens=10, stop_at_eos=False, seed=0)
    )
    assert all(s.finish_reason == "length" and len(s.token_ids) == 10 for xs in out for s in xs)
    # A one-token delimiter ends the step at that token.
    out = make_backend("hf", tiny_lm(tok, bias={"\n": 3.0}), tok).generate(
        prompts, 4, SamplingParams(max_new_tokens=10, stop_strings=("\n",), seed=0)
    )
    samples = [s for xs in out for s in xs]
    assert any(s.finish_reason == "delimiter" for s in samples)
    for s in samples:
        assert (s.finish_reason == "delimiter") == (s.token_ids[-1] == nl)
        assert nl not in s.token_ids[:-1]


def test_multi_token_delimiter(tok):
    """'ab' spans two tokens: the step ends at the 'b' that completes the first 'ab'."""
    check_multi_token_delimiter(make_backend("hf", tiny_lm(tok, bias={"a": 4.0, "b": 4.0}), tok), tok)


def check_multi_token_delimiter(backend, tok) -> None:
    """A backend whose model favours 'a' and 'b' stops each step at the first 'ab' (kept), or never sees
    one."""
    out = backend.generate(
        [ids(tok, p) for p in PROMPTS], 4, SamplingParams(max_new_tokens=16, stop_strings=("ab",), seed=0)
    )
    samples = [s for xs in out for s in xs]
    assert any(s.finish_reason == "delimiter" for s in samples)
    for s in samples:
        text = tok.decode(s.token_ids)
        if s.finish_reason == "delimiter":
            assert text.endswith("ab") and text.find("ab") == len(text) - 2
        else:
            assert "ab" not in text


def test_seed_determinism(tok):
    model = tiny_lm(tok)
    prompts = [ids(tok, p) for p in PROMPTS]

    def run(seed):
        out = make_backend("hf", model, tok).generate(prompts, 3, SamplingParams(max_new_tokens=8, seed=seed))
        return [s.token_ids for xs in out for s in xs]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_num_samples_list_and_zero(tok):
    backend = make_backend("hf", tiny_lm(tok), tok)
    out = backend.generate([ids(tok, "1+1"), ids(tok, "2+2")], [0, 3], SamplingParams(max_new_tokens=3))
    assert [len(x) for x in out] == [0, 3]
    assert backend.generate([ids(tok, "1")], 0, SamplingParams(max_new_tokens=3)) == [[]]
    with pytest.raises(ValueError, match="2 entries for 1 contexts"):
        backend.generate([ids(tok, "1")], [1, 1], SamplingParams(max_new_tokens=3))


def test_bad_inputs_name_the_values(tok):
    backend = make_backend("hf", tiny_lm(tok), tok)
    with pytest.raises(ValueError, match=r"120 tokens.*max_new_tokens=20.*140.*max_position_embeddings=128"):
        backend.generate([[5] * 120], 1, SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="max_new_tokens must be > 0, got 0"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        backend.generate([[]], 1, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=2, top_p=0.0)


def test_load_weights_invalidates_cache(tok):
    model = tiny_lm(tok)
    backend = make_backend("hf", model, tok)
    prompt = ids(tok, "5-3=")
    first = backend.generate([prompt], 1, SamplingParams(max_new_tokens=4, temperature=0))[0][0]
    other = tiny_lm(tok, seed=1)
    backend.load_weights(other.state_dict())
    backend.reset_stats()
    cont = prompt + first.token_ids
    out = backend.generate([cont], 1, SamplingParams(max_new_tokens=4, temperature=0))[0][0]
    assert backend.stats.cache_misses == 1 and backend.stats.cache_hits == 0
    assert out.logprobs == pytest.approx(fresh_logprobs(other, cont + out.token_ids, len(cont)), abs=1e-4)


def test_dropped_weights_free_their_memory_until_load_weights_brings_them_back_cast(tok):
    """The sampler beside the learner frees its copy during the update; the sync refills it from float32
    masters (cast as copied). A tied weight stays one tensor; generating or exporting in between is an
    error."""
    model = build_tiny_model(
        len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3
    )
    masters = {k: v.clone() for k, v in model.state_dict().items()}
    backend = make_backend("hf", model.to(torch.bfloat16).eval(), tok)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    before = backend.generate([ids(tok, "7+8=")], 1, greedy)[0][0]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert backend.drop_weights()
    assert sum(p.numel() for p in model.parameters()) == 0
    with pytest.raises(RuntimeError, match="dropped"):
        backend.generate([ids(tok, "7+8=")], 1, greedy)
    with pytest.raises(RuntimeError, match="dropped"):
        backend.weights()
    with pytest.raises(ValueError, match="lm_head.weight|embed_tokens"):
        backend.load_weights({k: v for k, v in masters.items() if "embed_tokens" not in k}, strict=False)
    backend.load_weights(masters)  # float32 into the bf16 model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(model.state_dict()[k].dtype == torch.bfloat16 for k in masters)
    assert all(torch.equal(model.state_dict()[k], v.to(torch.bfloat16)) for k, v in masters.items())
    after = backend.generate([ids(tok, "7+8=")], 1, greedy)[0][0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs


def test_bf16_runs(tok):
    model = tiny_lm(tok).to(torch.bfloat16)
    backend = make_backend("hf", model, tok)
    paths = grow(backend, [ids(tok, "4*4=")], 2, 2, lambda lv: SamplingParams(max_new_tokens=4, seed=lv))
    for seq, lps, _ in paths:
        assert len(lps) == 8 and all(lp <= 0 for lp in lps)
        # bf16 logits: the learner's recomputation agrees to bf16 precision.
        assert lps == pytest.approx(fresh_logprobs(model, seq, 4), abs=0.1)


def test_backend_registry(tok, monkeypatch):
    assert issubclass(get_backend_class("hf"), GenerationBackend)
    monkeypatch.setitem(
        sys.modules, "vllm", None
    )  # as where vllm is not installed (tests/rllib/test_vllm_backend.py)
    with pytest.raises(
        MissingExtraError, match=r'backend .vllm. needs the vllm package.*pip install "rllib_treerpo\[vllm\]"'
    ):
        make_backend("vllm", None, tok)
    with pytest.raises(ValueError, match=r"unknown generation backend 'nope'.*\['hf', 'vllm'\]"):
        get_backend_class("nope")


def test_package_import_is_lazy_and_ray_free():
    """With Ray absent (as on the GPU machine) generation and sampler import, and no backend until chosen."""
    code = (
        "import sys; sys.modules['ray'] = None; "  # `import ray` now fails, find_spec('ray') is None
        "import rllib_treerpo.generation, rllib_treerpo.sampling.sampler; "
        "assert not {'transformers', 'vllm', 'torch'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_max_batch_splits_a_call_and_keeps_the_caches_of_every_chunk(tok):
    """A call larger than max_batch decodes in chunks: greedy samples equal the unsplit call's, and the next
    level still continues every sample from its kept K/V (feeding one token each)."""
    model = tiny_lm(tok)
    contexts = [ids(tok, p) for p in PROMPTS]
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    sampled = SamplingParams(max_new_tokens=5, stop_at_eos=False, seed=3)
    whole = make_backend("hf", model, tok)
    split = make_backend(
        "hf", model, tok, max_batch=3
    )  # 4 contexts x 2 samples: chunks of 1 context (2 rows)
    assert [[s.token_ids for s in c] for c in whole.generate(contexts, 1, greedy)] == [
        [s.token_ids for s in c] for c in split.generate(contexts, 1, greedy)
    ]
    first = split.generate(contexts, 2, sampled)
    assert split.stats.forward_calls > 5 * 2  # it decoded in several loops
    nxt = list(
        {tuple(c + s.token_ids): None for c, samples in zip(contexts, first, strict=True) for s in samples}
    )
    split.reset_stats()
    again = split.generate([list(c) for c in nxt], 1, greedy)
    assert split.stats.cache_hits == len(nxt) and split.stats.prefill_tokens == len(nxt)  # one token each
    expected = whole.generate([list(c) for c in nxt], 1, greedy)
    assert [c[0].token_ids for c in again] == [c[0].token_ids for c in expected]
    with pytest.raises(ValueError, match="max_batch"):
        make_backend("hf", model, tok, max_batch=0)
