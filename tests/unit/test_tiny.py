"""The tiny offline model and tokenizer: what `make train` and the tests build instead of downloading."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from rllib_treerpo.models.tiny import build_char_tokenizer, build_tiny_model

TEXT = "5+9-9+6=?\n5+9=14\n \\boxed{\\frac{1}{2}} a  b\n\n~`'\"x"


def test_round_trip_one_token_per_character():
    tok = build_char_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.decode(tok(TEXT + "</s>", add_special_tokens=False)["input_ids"][-1:]) == "</s>"


def test_saved_folder_loads_back_identically_through_auto_classes(tmp_path):
    # A qwen2 config.json makes AutoTokenizer rebuild a Qwen2Tokenizer: encodings must not change.
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert loaded.decode(loaded(TEXT)["input_ids"]) == TEXT
    assert (loaded.eos_token_id, loaded.pad_token_id) == (2, 0)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.vocab_size == len(tok)
