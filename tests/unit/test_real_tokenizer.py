"""A real byte-level BPE (merges, ChatML special tokens, eos = <|im_end|>): chat prompts, EOS handling and
every leaf scored in the hf backend and the sampler; step texts decoded over the whole path (a character cut
between steps)."""

from __future__ import annotations

import math

import pytest

from envs import ArithmeticEnv
from rllib_treerpo.generation import GenerationBackend, Sample, SamplingParams, make_backend
from rllib_treerpo.models.tiny import build_bpe_tokenizer
from rllib_treerpo.sampling.detokenize import REPLACEMENT, decode_steps
from rllib_treerpo.sampling.evaluation import Evaluator
from rllib_treerpo.sampling.prompts import prompt_tokenizer
from rllib_treerpo.sampling.sampler import TreeSpec, grow_trees
from tests.unit.test_generation import fresh_logprobs, tiny_lm, token_id
from tests.unit.test_sampler import FakeEnv


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer()


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_bpe_tokenizer_is_real_deterministic_and_reloads(bpe, tmp_path):
    from transformers import AutoTokenizer

    from rllib_treerpo.models.tiny import build_tiny_model

    assert [bpe.convert_ids_to_tokens(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert bpe.eos_token == "<|im_end|>" and bpe.eos_token_id == 2 and bpe.pad_token_id == 0
    assert len(encode(bpe, " answer")) == 1  # merges exist
    assert len(encode(bpe, "\u2713")) == 3  # a character outside the corpus: one token per UTF-8 byte
    text = "<|im_start|>user\nWhat is 7 + 5? \u2713 \U0001f389<|im_end|>"
    assert bpe.decode(encode(bpe, text)) == text
    assert encode(bpe, text)[0] == 1 and encode(bpe, text)[-1] == 2  # special tokens stay whole
    assert build_bpe_tokenizer().get_vocab() == bpe.get_vocab()
    build_tiny_model(
        len(bpe), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path)
    bpe.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)  # a qwen2 folder: rebuilt as Qwen2Tokenizer, same ids
    assert encode(again, text) == encode(bpe, text) and again.chat_template == bpe.chat_template
    same = build_bpe_tokenizer(pad_token="<|im_end|>")
    assert same.pad_token_id == same.eos_token_id == 2


def test_chat_template_prompt_uses_the_special_tokens(bpe):
    wrapped = prompt_tokenizer(bpe, chat_template=True, system_prompt="Be brief.")
    ids = wrapped("7+5=?", add_special_tokens=False)["input_ids"]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n7+5=?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert bpe.decode(ids) == expected
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2, each one id


@pytest.mark.parametrize("pad", ["<|endoftext|>", "<|im_end|>"])
def test_hf_backend_stops_at_the_template_end_token(pad):
    tok = build_bpe_tokenizer(pad_token=pad)
    model = tiny_lm(tok, bias={"<|im_end|>": 3.0})
    backend = make_backend("hf", model, tok)
    assert backend.eos_token_ids == [2] and backend.pad_token_id == tok.pad_token_id
    prompt = encode(tok, tok.apply_chat_template([{"role": "user", "content": "7+5=?"}], tokenize=False))
    prompt += encode(tok, "<|im_start|>assistant\n")
    out = backend.generate([prompt, prompt[:5]], 6, SamplingParams(max_new_tokens=12, seed=0))
    samples = [s for group in out for s in group]
    assert {s.finish_reason for s in samples} == {"eos", "length"}  # rows end at different steps (padding)
    for s in samples:
        assert (s.finish_reason == "eos") == (s.token_ids[-1] == 2) and 2 not in s.token_ids[:-1]
    for context, group in zip([prompt, prompt[:5]], out, strict=True):
        for s in group:
            fresh = fresh_logprobs(model, context + s.token_ids, len(context))
            assert s.logprobs == pytest.approx(fresh, abs=1e-4)


def arithmetic_roots(n: int) -> list[ArithmeticEnv]:
    roots = [ArithmeticEnv(num_ops=1, seed=0) for _ in range(n)]
    for i, env in enumerate(roots):
        env.reset(options={"problem_index": i})
    return roots


@pytest.mark.parametrize(
    "pad,eos_ids,bias",
    [
        ("<|endoftext|>", None, {"<|im_end|>": 3.0}),  # the EOS text is the env's stop text
        ("<|im_end|>", None, {"<|im_end|>": 3.0}),  # pad == eos
        ("<|endoftext|>", [2, 0], {"<|endoftext|>": 3.0}),  # an EOS id whose text is not the stop text
    ],
)
def test_trees_end_leaves_at_the_end_token_and_score_every_leaf(pad, eos_ids, bias):
    tok = build_bpe_tokenizer(pad_token=pad)
    backend = make_backend("hf", tiny_lm(tok, bias=bias), tok, eos_token_ids=eos_ids)
    wrapped = prompt_tokenizer(tok, chat_template=True)
    trees = grow_trees(arithmetic_roots(3), backend, wrapped, TreeSpec((2, 2, 2), 5, seed=0))
    end_id = token_id(tok, next(iter(bias)))
    scorer = ArithmeticEnv(num_ops=1)
    ended = 0
    for tree in trees:
        assert tree.prompt_ids[0] == 1 and tok.decode(tree.prompt_ids).endswith("<|im_start|>assistant\n")
        for node in tree.nodes[1:]:
            stopped = node.token_ids[-1] == end_id
            assert stopped == (node.finish_reason == "eos") and end_id not in node.token_ids[:-1]
            if stopped:
                ended += 1
                assert node.terminal and not node.children
        for i in tree.leaves():
            leaf = tree.nodes[i]
            assert math.isfinite(leaf.reward)
            response = tree.response_text(i)
            assert response == tok.decode(tree.path_ids(i)[len(tree.prompt_ids) :])
            scored = response.split("<|im_end|>")[0]  # the env cut its stop text (the tokenizer's EOS text)
            assert leaf.reward == scorer._score(scored, tree.answer)
    assert ended > 0


def test_evaluator_with_a_chat_template_scores_every_sample(bpe):
    backend = make_backend("hf", tiny_lm(bpe, bias={"<|im_end|>": 2.0}), bpe)
    evaluator = Evaluator(
        ArithmeticEnv(num_ops=1, split="test"),
        backend,
        prompt_tokenizer(bpe, chat_template=True),
        problems=3,
        samples=2,
        max_new_tokens=16,
    )
    summary, rows = evaluator()
    assert summary["problems"] == 3 and all(len(r["rewards"]) == 2 for r in rows)
    assert all(math.isfinite(x) for r in rows for x in r["rewards"] + [r["greedy_reward"]])


# ------------------------------------------------------------------ text over the whole path
class ScriptBackend(GenerationBackend):
    """Every context continues with the same scripted response (after a prompt of ``prompt_len`` tokens)."""

    name = "script"

    def __init__(self, script: list[int], prompt_len: int, eos: int) -> None:
        super().__init__()
        self.script, self.prompt_len, self.eos = script, prompt_len, eos

    def generate(self, contexts, num_samples, params: SamplingParams):
        out = []
        for context, n in zip(contexts, self._expand_num_samples(num_samples, len(contexts)), strict=True):
            at = len(context) - self.prompt_len
            toks = self.script[at : at + params.max_new_tokens]
            reason = "eos" if toks[-1] == self.eos else "length"
            out.append([Sample(list(toks), [0.0] * len(toks), reason) for _ in range(n)])
        return out

    def load_weights(self, state_dict) -> None:
        pass

    def clear_cache(self) -> None:
        pass


@pytest.mark.parametrize("step_tokens", [1, 2, 3, 4])
def test_a_character_cut_between_steps_reaches_the_env_whole(bpe, step_tokens):
    response = "ok \u2713 then \U0001f389 done"
    script = encode(bpe, response) + [bpe.eos_token_id]
    env = FakeEnv("Q? ", answer="\u2713", max_steps=64)
    env.reset()
    prompt_len = len(encode(bpe, env.prompt))
    depth = math.ceil(len(script) / step_tokens)
    spec = TreeSpec((1,) * depth, step_tokens)
    (tree,) = grow_trees([env], ScriptBackend(script, prompt_len, bpe.eos_token_id), bpe, spec)
    (leaf,) = tree.leaves()
    texts = [tree.nodes[i].text for i in tree.path(leaf)]
    assert "".join(texts) == bpe.decode(script) == response + "<|im_end|>"
    assert not any(REPLACEMENT in t for t in texts)
    if step_tokens < 4:
        assert "" in texts  # a step that ended inside a character committed nothing yet
    assert tree.nodes[leaf].reward == 1.0  # the env saw the check mark whole
    # Decoding each step alone (the old way) puts U+FFFD into the text.
    assert any(REPLACEMENT in bpe.decode(tree.nodes[i].token_ids) for i in tree.path(leaf))


def test_decode_steps_holds_back_only_an_unfinished_tail(bpe):
    check = encode(bpe, "a\u2713")  # "a" + 3 byte tokens
    steps = decode_steps(bpe, [check[:2], check[:3], check], ["", "", "a"], [False, False, False])
    assert steps == [("a", "a"), ("a", "a"), ("\u2713", "a\u2713")]
    leaf = decode_steps(bpe, [check[:2]], [""], [True])  # a leaf commits everything, broken bytes included
    assert leaf == [("a" + REPLACEMENT, "a" + REPLACEMENT)]
