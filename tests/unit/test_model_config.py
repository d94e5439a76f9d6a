"""model_io.check_model_config: a model with sliding-window layers fails in one line before any weights
load."""

from __future__ import annotations

import re

import pytest
from transformers import Gemma2Config, Gemma3Config, LlamaConfig, Qwen2Config

from rllib_treerpo.jobs.cli import main
from rllib_treerpo.models.model_io import check_model_config

SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2}


def config_folder(tmp_path, config):
    config.save_pretrained(tmp_path)  # config.json only: no weights, so a model load would fail differently
    return str(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        Gemma2Config(num_hidden_layers=4, **SMALL),
        Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, **SMALL),
        Gemma3Config(text_config={"num_hidden_layers": 6, **SMALL}),  # multimodal: the text config's layers
    ],
    ids=["gemma2", "qwen2-sliding", "gemma3"],
)
def test_sliding_window_layers_are_refused(tmp_path, config):
    folder = config_folder(tmp_path, config)
    with pytest.raises(ValueError) as info:
        check_model_config(folder)
    message = str(info.value)
    assert message.startswith(f"config field 'model_name_or_path' = {folder!r}: layer_types [")
    assert "sliding_attention x" in message and "supports full attention only" in message
    assert "\n" not in message


@pytest.mark.parametrize("config", [Qwen2Config(num_hidden_layers=2, **SMALL), LlamaConfig(**SMALL)])
def test_full_attention_models_pass(tmp_path, config):
    check_model_config(config_folder(tmp_path, config))


def test_unreadable_or_remote_configs_are_left_to_the_load(tmp_path):
    check_model_config(None)
    check_model_config(str(tmp_path))  # a folder without config.json
    check_model_config("no-such-org/no-such-model")  # a hub name not in the local cache: no network


def test_eval_refuses_before_loading(tmp_path, capsys):
    folder = config_folder(tmp_path / "gemma", Gemma2Config(num_hidden_layers=2, **SMALL))
    code = main(
        ["eval", "--model", folder, "--env", "treerpo/Arithmetic-v0", "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "sliding-window layers" in err
    assert not (tmp_path / "o").exists()


def test_check_model_path_names_a_local_path_that_cannot_be_a_model(tmp_path):
    from rllib_treerpo.models.model_io import check_model_path

    for ok in (None, "gpt2", "Qwen/Qwen2.5-Math-1.5B"):  # null (the embedded model) and hub names pass
        check_model_path(ok)
    (tmp_path / "weights.bin").write_text("")
    for path, why in (
        ("no/such/dir", "no such folder"),
        ("./missing", "no such folder"),
        (str(tmp_path / "weights.bin"), "a file"),
        (str(tmp_path), "no config.json"),
    ):
        with pytest.raises(ValueError, match=f"'model_name_or_path' = '{re.escape(path)}': {why}"):
            check_model_path(path)


def test_a_model_that_cannot_be_loaded_is_one_line_naming_the_field(tmp_path, tiny_lm_dir):
    """A folder with a config but no weights: one ValueError naming model_name_or_path, not transformers'
    OSError."""
    import shutil

    from rllib_treerpo.models.model_io import load_causal_lm

    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(f"{tiny_lm_dir}/config.json", folder / "config.json")
    with pytest.raises(ValueError, match="config field 'model_name_or_path'.*cannot load it") as caught:
        load_causal_lm(str(folder))
    assert "\n" not in str(caught.value)
