"""Model I/O, one place: load a causal LM, find a policy's weights (Hugging Face folder, run folder, RLlib
checkpoint), translate RLModule state to Hugging Face names and back, write a Hugging Face folder. Ray-free,
except that reading the algorithm config pickled inside a bare RLlib checkpoint needs Ray's classes.

Names: the RLModule (rllib/rl_module.py) holds the transformers model as ``self.model``, so its state keys are
``"model." + <Hugging Face key>``; a PPO module's value head (``value_head.*``) is not part of the policy.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODULE_PREFIX = "model."
# Where RLlib's checkpoint of TreeRPO keeps the learner's (trained) policy.
MODULE_PATH = Path("learner_group") / "learner" / "rl_module" / "default_policy"
RUN_CONFIG = "treerpo_run.yaml"  # the settings of the run a final_model/ came from (env, tree, template, ...)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_causal_lm(model_name_or_path: str | None, dtype: str = "float32"):
    """``AutoModelForCausalLM.from_pretrained`` with a clear error when no model is configured."""
    from transformers import AutoModelForCausalLM

    if not model_name_or_path:
        raise ValueError(
            "config field 'model_name_or_path' is not set: give a model folder or hub name "
            "(`treerpo train` sets it to its warm-started tiny model when it is null)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"config field 'dtype' = {dtype!r}: must be one of {list(DTYPES)}")
    with _loading(model_name_or_path):
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=DTYPES[dtype])


@contextlib.contextmanager
def _loading(model_name_or_path: str):
    """A model or tokenizer that cannot be loaded (a hub name with no network and no cached copy, a folder
    missing files) is one ValueError naming the config field, not transformers' traceback."""
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"config field 'model_name_or_path' = {model_name_or_path!r}: cannot load it "
            f"({first}). A local model: check the path (`treerpo get-model` writes one); a hub name "
            "needs the network once"
        ) from e


def check_model_config(model_name_or_path: str | None) -> None:
    """Cheap checks on a model's config.json alone (no weights), before any expensive load.

    Refuses a model with sliding-window layers (Gemma-2/3, Qwen2 with use_sliding_window, ...): the hf
    backend's cache supports full attention only. The ``layer_types`` of the config, or of its text config
    (multimodal models), are read. Never goes to the network: a hub name is checked when its config is in the
    local Hugging Face cache; a config that cannot be read here is left to the model load to report (the hf
    backend refuses such a model again after loading).
    """
    if not model_name_or_path:
        return
    from transformers import AutoConfig

    local = Path(model_name_or_path).expanduser().is_dir()
    try:
        hf_config = AutoConfig.from_pretrained(model_name_or_path, local_files_only=not local)
    except (OSError, ValueError, KeyError):
        return
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    layer_types = list(
        getattr(text_config, "layer_types", None) or getattr(hf_config, "layer_types", None) or []
    )
    if any(t != "full_attention" for t in layer_types):
        kinds = {t: layer_types.count(t) for t in layer_types}
        summary = ", ".join(f"{t} x{n}" for t, n in kinds.items())
        raise ValueError(
            f"config field 'model_name_or_path' = {model_name_or_path!r}: layer_types [{summary}] has "
            "sliding-window layers; the hf backend supports full attention only"
        )


def check_model_path(model_name_or_path: str | None) -> None:
    """ValueError naming config field ``model_name_or_path`` when it is a local path that cannot be a model:
    missing (and not shaped like a hub name, ``org/name`` or ``name``), a file, or a folder without
    config.json. Hub names and null (the job's embedded model) pass; nothing goes to the network."""
    if not isinstance(model_name_or_path, str):
        return
    path = Path(model_name_or_path).expanduser()
    field = f"config field 'model_name_or_path' = {model_name_or_path!r}"
    if not path.exists():
        hub_shaped = re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", model_name_or_path)
        if hub_shaped and not model_name_or_path.startswith((".", "/", "~")):
            return
        raise ValueError(
            f"{field}: no such folder (and not a hub name: org/name); `treerpo get-model` writes one"
        )
    if not path.is_dir():
        raise ValueError(f"{field}: a file; expected a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{field}: no config.json in this folder; expected a Hugging Face model folder")


def load_tokenizer(model_name_or_path: str):
    from transformers import AutoTokenizer

    with _loading(model_name_or_path):
        return AutoTokenizer.from_pretrained(model_name_or_path)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked; any id works)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def hf_weights(module_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """RLModule state -> the policy's weights under Hugging Face names (plain tensors, never numpy)."""
    return {
        k.removeprefix(MODULE_PREFIX): torch.as_tensor(v).as_subclass(torch.Tensor)
        for k, v in module_state.items()
        if k.startswith(MODULE_PREFIX)
    }


def module_state(weights: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Hugging Face weights -> RLModule state keys (the inverse of :func:`hf_weights`)."""
    return {MODULE_PREFIX + k: torch.as_tensor(v) for k, v in weights.items()}


def save_hf_folder(
    base_model: str, weights: Mapping[str, Any], folder: str | Path, dtype: str = "float32"
) -> None:
    """Write ``weights`` (Hugging Face names) on the architecture, generation config and tokenizer of
    ``base_model`` to ``folder``, floating tensors in ``dtype``.

    The architecture is built on the meta device and takes the given tensors as its own (cast once each: tied
    weights stay one tensor), so no copy of the base model's weights is loaded to be overwritten (for a run's
    export that copy was the job's peak memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with _loading(base_model):
        config = AutoConfig.from_pretrained(base_model)
    target = DTYPES[dtype]
    cast = {}
    state = {}
    for name, value in weights.items():
        tensor = torch.as_tensor(value)
        if tensor.is_floating_point():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            tensor = cast[key] if key in cast else cast.setdefault(key, tensor.to(target))
        state[name] = tensor
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    with contextlib.suppress(OSError):  # a base model without generation_config.json keeps the derived one
        model.generation_config = GenerationConfig.from_pretrained(base_model)
    model.save_pretrained(folder)
    load_tokenizer(base_model).save_pretrained(folder)


# --- where a policy's weights are
# -----------------------------------------------------------------------------
@dataclass
class ResolvedModel:
    """Where the weights are: ``kind`` is "hf" (``path`` is a folder or hub name) or "checkpoint"."""

    kind: str
    path: str
    train_config: dict[str, Any] = field(default_factory=dict)  # empty for a plain model
    description: str = ""


def is_hf_folder(p: Path) -> bool:
    return (p / "config.json").is_file()


def is_checkpoint(p: Path) -> bool:
    return (p / "rllib_checkpoint.json").is_file()


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """``checkpoints/latest``'s target if it is a checkpoint, else the highest ``iter_N`` one."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        target = ckpt_dir / latest.read_text().strip()
        if is_checkpoint(target):
            return target
    found = sorted((p for p in ckpt_dir.glob("iter_*") if is_checkpoint(p)), key=_iteration_number)
    return found[-1] if found else None


def _iteration_number(p: Path) -> int:
    digits = p.name.removeprefix("iter_")
    return int(digits) if digits.isdigit() else -1


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    return values if isinstance(values, dict) else {}


def _checkpoint_config(ckpt: Path) -> dict[str, Any]:
    """The training config of a checkpoint: the run's config.yaml if it sits in a `treerpo train` output
    folder, else the algorithm config pickled in the checkpoint itself (unpickling it needs Ray)."""
    run_config = ckpt.parent.parent / "config.yaml"
    if ckpt.parent.name == "checkpoints" and run_config.is_file():
        return _read_yaml(run_config)
    import pickle

    import ray.rllib  # noqa: F401  the pickle holds RLlib classes

    try:
        with open(ckpt / "class_and_ctor_args.pkl", "rb") as f:
            ctor = pickle.load(f)
        config = ctor["ctor_args_and_kwargs"][0][0]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is "not a TreeRPO checkpoint"
        raise ValueError(f"{ckpt}: cannot read the algorithm config of this RLlib checkpoint ({e})") from e
    return config if isinstance(config, dict) else config.to_dict()


def resolve_model(path: str) -> ResolvedModel:
    """Classify a model path: a Hugging Face folder (a run's ``final_model/`` brings its run's config), an
    RLlib checkpoint, a `treerpo train` output folder (its final model, else its latest checkpoint) or a hub
    name. Anything else is a ValueError naming the path."""
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_NAME.match(path) and not path.startswith((".", "/", "~")):
            return ResolvedModel("hf", path, description=f"hub model {path}")
        raise ValueError(f"{path}: no such file or folder")
    if not p.is_dir():
        raise ValueError(
            f"{path}: is a file; expected a model folder, a `treerpo train` output folder or an "
            "RLlib checkpoint folder"
        )
    if is_hf_folder(p):
        # The run's settings give the defaults: recorded inside the folder (RUN_CONFIG, kept when it is copied
        # elsewhere), else the run folder's config.yaml next to OUTPUT/final_model.
        run_config = p / RUN_CONFIG if (p / RUN_CONFIG).is_file() else p.parent / "config.yaml"
        train_config = (
            _read_yaml(run_config)
            if run_config.is_file() and (run_config.parent == p or p.name == "final_model")
            else {}
        )
        return ResolvedModel("hf", str(p), train_config, f"Hugging Face model {p}")
    if is_checkpoint(p):
        if not (p / MODULE_PATH).is_dir():
            raise ValueError(
                f"{path}: an RLlib checkpoint without {MODULE_PATH} (the learner's policy); not a "
                "TreeRPO checkpoint?"
            )
        return ResolvedModel("checkpoint", str(p), _checkpoint_config(p), f"checkpoint {p}")
    if (p / "final_model").is_dir() and is_hf_folder(p / "final_model"):
        train_config = _read_yaml(p / "config.yaml") if (p / "config.yaml").is_file() else {}
        return ResolvedModel("hf", str(p / "final_model"), train_config, f"final model of the run {p}")
    for ckpt_dir in (p / "checkpoints", p):
        if ckpt_dir.is_dir() and (ckpt := latest_checkpoint(ckpt_dir)) is not None:
            return resolve_model(str(ckpt))
    raise ValueError(
        f"{path}: not a model: expected a Hugging Face model folder (config.json), a `treerpo train` "
        "output folder (final_model/ or checkpoints/latest) or an RLlib checkpoint folder "
        "(rllib_checkpoint.json)"
    )


def read_module_state(module_dir: Path) -> dict[str, Any]:
    """The RLModule state file of an RLlib checkpoint (``module_state.pkl`` or ``.msgpack``)."""
    pkl = module_dir / "module_state.pkl"
    msg = module_dir / "module_state.msgpack"
    if pkl.is_file():
        import pickle

        with open(pkl, "rb") as f:
            return pickle.load(f)
    if msg.is_file():
        import msgpack
        import msgpack_numpy  # RLlib writes numpy arrays through msgpack-numpy

        msgpack_numpy.patch()
        with open(msg, "rb") as f:
            return msgpack.load(f, strict_map_key=False)
    raise ValueError(f"no module_state.pkl or module_state.msgpack in {module_dir}")


def load_policy(resolved: ResolvedModel, dtype: str = "float32"):
    """``(model, tokenizer, base_model)``: the policy as a transformers causal LM in eval mode."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: must be one of {list(DTYPES)}")
    if resolved.kind == "hf":
        try:
            model = load_causal_lm(resolved.path, dtype)
            tokenizer = load_tokenizer(resolved.path)
        except OSError as e:
            raise ValueError(f"{resolved.path}: cannot load it: {str(e).splitlines()[0]}") from e
        return model.eval(), tokenizer, resolved.path

    base = resolved.train_config.get("model_name_or_path")
    if not base:
        raise ValueError(f"{resolved.path}: the checkpoint's config has no model_name_or_path")
    try:
        model = load_causal_lm(base, dtype)
        tokenizer = load_tokenizer(base)
    except OSError as e:
        raise ValueError(
            f"{resolved.path}: its base model {base!r} (model_name_or_path) cannot be loaded: "
            f"{str(e).splitlines()[0]}"
        ) from e
    try:
        model.load_state_dict(hf_weights(read_module_state(Path(resolved.path) / MODULE_PATH)), strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{resolved.path}: the checkpoint's weights do not fit its base model {base!r}: "
            f"{str(e).splitlines()[0]}"
        ) from e
    return model.eval(), tokenizer, base
