"""Prompt formatting (rllib_treerpo/sampling/prompts.py): plain prompts, chat templates, and the sampler
seeing them."""

from __future__ import annotations

import pytest

from rllib_treerpo.models.tiny import build_char_tokenizer
from rllib_treerpo.rllib.algorithm import TreeRPOConfig
from rllib_treerpo.sampling.prompts import PromptTokenizer, format_prompt, prompt_tokenizer

# A ChatML-like template written with characters the char-level tokenizer knows.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}[{{ m['content'] }}]{% endfor %}"
)


@pytest.fixture
def tok():
    return build_char_tokenizer()


@pytest.fixture
def chat_tok():
    t = build_char_tokenizer()
    t.chat_template = TEMPLATE
    return t


def test_plain_prompt_is_unchanged_or_gets_the_system_line(tok):
    assert format_prompt(tok, "7+5=?\n") == "7+5=?\n"
    assert format_prompt(tok, "7+5=?\n", system_prompt="Be brief.") == "Be brief.\n7+5=?\n"
    assert prompt_tokenizer(tok) is tok  # nothing configured: no wrapper at all


def test_chat_template_wraps_the_prompt_as_a_user_turn(chat_tok):
    assert format_prompt(chat_tok, "7+5=?", chat_template=True) == "<|user|>7+5=?<|end|>\n<|assistant|>"
    with_system = format_prompt(chat_tok, "7+5=?", chat_template=True, system_prompt="Be brief.")
    assert with_system == "<|system|>Be brief.<|end|>\n<|user|>7+5=?<|end|>\n<|assistant|>"


def test_missing_or_failing_template_names_the_field(tok):
    with pytest.raises(ValueError, match="'chat_template'.*no chat template"):
        format_prompt(tok, "x", chat_template=True)
    with pytest.raises(ValueError, match="'chat_template'"):
        prompt_tokenizer(tok, chat_template=True)  # checked up front, not at the first prompt
    tok.chat_template = NO_SYSTEM
    assert format_prompt(tok, "x", chat_template=True) == "[x]"
    with pytest.raises(ValueError, match="'system_prompt'.*System role not supported"):
        format_prompt(tok, "x", chat_template=True, system_prompt="s")


def test_prompt_tokenizer_formats_only_prompts(chat_tok):
    wrapped = prompt_tokenizer(chat_tok, chat_template=True)
    assert isinstance(wrapped, PromptTokenizer)
    ids = wrapped("7+5=?", add_special_tokens=False)["input_ids"]
    assert ids == chat_tok("<|user|>7+5=?<|end|>\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert wrapped.decode(ids) == "<|user|>7+5=?<|end|>\n<|assistant|>"  # decode is the tokenizer's own
    assert wrapped.eos_token == chat_tok.eos_token and len(wrapped) == len(chat_tok)


def test_sampler_feeds_the_templated_prompt(chat_tok):
    from envs import ArithmeticEnv
    from rllib_treerpo.generation import make_backend
    from rllib_treerpo.models.tiny import build_tiny_model
    from rllib_treerpo.sampling.sampler import sample_trees

    model = build_tiny_model(
        len(chat_tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=256
    ).eval()
    env = ArithmeticEnv(num_ops=1, seed=0)
    env.reset(options={"problem_index": 0})
    wrapped = prompt_tokenizer(chat_tok, chat_template=True, system_prompt="Add.")
    tree = sample_trees(
        [env], make_backend("hf", model, chat_tok), wrapped, branching=[2], step_tokens=4, seed=0
    )[0]
    expected = f"<|system|>Add.<|end|>\n<|user|>{env.prompt}<|end|>\n<|assistant|>"
    assert chat_tok.decode(tree.prompt_ids) == expected
    assert len(tree.leaves()) == 2


def test_config_fields_exist_and_validate():
    c = TreeRPOConfig.from_yaml(None, {"chat_template": True, "system_prompt": "Think."})
    assert c.chat_template is True and c.system_prompt == "Think."
    assert TreeRPOConfig().chat_template is False and TreeRPOConfig().system_prompt is None
    with pytest.raises(ValueError, match="'chat_template'"):
        TreeRPOConfig.from_yaml(None, {"chat_template": "yes"})
    with pytest.raises(ValueError, match="'system_prompt'"):
        TreeRPOConfig.from_yaml(None, {"system_prompt": ""})
