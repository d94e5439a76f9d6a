"""The embedded default's warm start: the shipped model is used wherever it matches the settings (no SFT run),
other settings build into the cache once, and every build records how it was made."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest

from rllib_treerpo.models import warmstart

ROOT = Path(__file__).resolve().parents[2]
ENV = "treerpo/Arithmetic-v0"
# A tiny build (seconds): another architecture and a few SFT steps, so the shipped model does not match.
SMALL = {
    "tiny_model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "warmstart": {"steps": 3, "batch_size": 8, "demos": 64},
}


def _no_training(*args, **kwargs):
    raise AssertionError("the warm start was trained, where a built model was expected")


def test_the_shipped_warm_start_matches_the_defaults_and_make_train():
    """Fails when the warm start's settings change (settings.py's job defaults, configs/tiny_arith.yaml) and
    the shipped model was not rebuilt: every run would then build its own, machine-dependent warm start."""
    from rllib_treerpo.config.config_files import read_config_file
    from rllib_treerpo.config.settings import RLLIB_FIELD_CHECKS

    record = warmstart.read_record(warmstart.SHIPPED)
    assert record is not None, f"no {warmstart.SHIPPED}/build.json: build it with {warmstart.REBUILD}"
    defaults = warmstart.fingerprint(
        RLLIB_FIELD_CHECKS["env"].default, RLLIB_FIELD_CHECKS["env_config"].default
    )
    make_train = read_config_file(ROOT / "configs" / "tiny_arith.yaml")
    from_yaml = warmstart.fingerprint(
        make_train["env"], make_train["env_config"], make_train["tiny_model"], make_train["warmstart"]
    )
    rebuild = (
        f"the warm start's settings changed: rebuild the shipped model ({warmstart.REBUILD}) and commit it"
    )
    assert record["fingerprint"] == defaults, f"job defaults: {rebuild}"
    assert record["fingerprint"] == from_yaml, f"configs/tiny_arith.yaml: {rebuild}"
    assert record["settings"] == warmstart._settings(ENV, {}, None, None)


def test_the_shipped_model_is_used_without_building(monkeypatch, tmp_path):
    monkeypatch.setenv("TREERPO_CACHE", str(tmp_path))
    monkeypatch.setattr(warmstart, "_train", _no_training)
    logged = []
    folder = warmstart.embedded_model(ENV, {}, log=logged.append)
    assert Path(folder) == warmstart.SHIPPED and "shipped" in logged[0]
    assert not list(tmp_path.iterdir())  # nothing built or copied into the cache
    record = warmstart.read_record(folder)
    weights = (Path(folder) / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == record["weights_sha256"], "weights differ from the record"
    for key in ("torch", "cpu_capability", "threads", "sft_seconds", "command", "held_out"):
        assert record[key] not in (None, ""), key
    assert 0 <= record["held_out"]["greedy_accuracy"] <= 1 and record["held_out"]["problems"] == 200

    from rllib_treerpo.models.model_io import load_causal_lm

    model = load_causal_lm(folder, "float32")
    assert 0.3e6 < sum(p.numel() for p in model.parameters()) < 0.4e6


def test_other_settings_build_into_the_cache_once_with_a_record(monkeypatch, tmp_path):
    monkeypatch.setenv("TREERPO_CACHE", str(tmp_path))
    monkeypatch.setattr(warmstart, "build", functools.partial(warmstart.build, held_out_problems=4))
    folder = Path(warmstart.embedded_model(ENV, {}, **SMALL, log=lambda m: None))
    assert folder == warmstart.embedded_model_folder(ENV, {}, **SMALL) and folder.parent == tmp_path
    record = warmstart.read_record(folder)
    assert record["fingerprint"] == warmstart.fingerprint(ENV, {}, **SMALL) != warmstart.fingerprint(ENV, {})
    assert record["settings"]["warmstart"]["steps"] == 3 and record["settings"]["tiny"]["hidden_size"] == 32
    # a 3-step SFT can take a few milliseconds: the record keeps them (rounded to ms)
    assert record["held_out"]["problems"] == 4 and record["sft_seconds"] >= 0.001
    assert record["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary folder left

    monkeypatch.setattr(warmstart, "_train", _no_training)  # the second time: the cached one
    assert warmstart.embedded_model(ENV, {}, **SMALL, log=lambda m: None) == str(folder)

    run = tmp_path / "run"
    run.mkdir()
    warmstart.copy_record(folder, run)  # what `treerpo train` does with its model
    assert json.loads((run / "warmstart_build.json").read_text()) == record
    warmstart.copy_record(tmp_path / "no_record", run / "x")  # a model without a record: nothing to copy


def test_build_warmstart_set_ignores_the_shipped_model(monkeypatch, tmp_path):
    """TREERPO_BUILD_WARMSTART=1 (benchmarks/seeds.py --rebuild-warmstart): the defaults are built on this
    machine into the cache, as where no shipped model matched (the build itself: the test above)."""
    monkeypatch.setenv("TREERPO_CACHE", str(tmp_path))
    monkeypatch.setenv(warmstart.BUILD_ENV, "1")
    built = []
    monkeypatch.setattr(
        warmstart, "build", lambda folder, *args, **kwargs: built.append(folder) or str(folder)
    )
    assert warmstart.embedded_model(ENV, {}, log=lambda m: None) == str(
        warmstart.embedded_model_folder(ENV, {})
    )
    assert built == [tmp_path / f"warmstart-{warmstart.fingerprint(ENV, {})[:12]}"]


def test_a_record_that_does_not_match_is_not_used(monkeypatch, tmp_path):
    shipped = tmp_path / "embedded"
    shipped.mkdir()
    (shipped / "config.json").write_text("{}")
    (shipped / "build.json").write_text(json.dumps({"fingerprint": "0" * 64}))
    monkeypatch.setattr(warmstart, "SHIPPED", shipped)
    assert warmstart.shipped_model("0" * 64) == str(shipped)
    assert warmstart.shipped_model(warmstart.fingerprint(ENV, {})) is None


@pytest.mark.parametrize("path", ["config.json", "model.safetensors", "tokenizer.json", "build.json"])
def test_the_shipped_files_are_package_data(path):
    """pyproject.toml's package-data puts models/embedded/* into wheels and sdists (non-editable installs)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\n"rllib_treerpo.models" = ["embedded/*"]' in pyproject
    assert (warmstart.SHIPPED / path).is_file()
