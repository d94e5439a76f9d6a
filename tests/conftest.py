"""Shared fixtures: a tiny random causal LM saved to disk (no downloads), the embedded default model, and one
Ray session; `slow` tests run only with ``pytest --run-slow``.

Built models are cached in a temporary folder for the session ($TREERPO_CACHE, set before anything imports the
package or starts Ray, so Ray's workers see it too): tests never read or fill the user's ~/.cache. The
embedded default is the shipped warm start ($TREERPO_BUILD_WARMSTART cleared: no test builds it).
"""

import os
import tempfile

import pytest

os.environ["TREERPO_CACHE"] = tempfile.mkdtemp(prefix="treerpo-test-cache-")
os.environ.pop("TREERPO_BUILD_WARMSTART", None)


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked slow (downloads, real models)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with pytest --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A 1-layer random Qwen2 with the char tokenizer, saved like any Hugging Face model folder."""
    from rllib_treerpo.models.tiny import TEST_ARCHITECTURE, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_lm"), **TEST_ARCHITECTURE)


# The one local Ray instance the tests share (tests/cluster puts it back after its multi-node cluster).
RAY_TEST_SESSION = {
    "num_cpus": 2,
    "include_dashboard": False,
    "logging_level": "ERROR",
    "log_to_driver": False,
}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs actors (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(**RAY_TEST_SESSION)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_default():
    """The embedded default model (what ``model_name_or_path: null`` resolves to): the shipped warm start,
    used as is (no SFT run). Returns its folder."""
    from rllib_treerpo.models.warmstart import REBUILD, fingerprint, shipped_model
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig

    config = TreeRPOConfig()
    folder = shipped_model(fingerprint(config.env, config.env_config))
    assert folder is not None, f"the shipped warm start does not match the defaults: rebuild it ({REBUILD})"
    return folder


@pytest.fixture(autouse=True, scope="session")
def cpu_without_bf16():
    """``dtype: auto`` resolves as on a CPU without bf16 instructions in every test, so a test computes the
    same numbers (float32) on every machine; tests of the choice itself pass their own Hardware
    (tests/unit/test_dtype_auto.py). Session-scoped: module-scoped fixtures (an uninterrupted reference run)
    are built before any function-scoped one, and must resolve the same way as their tests."""
    from rllib_treerpo.learner import precision

    patch = pytest.MonkeyPatch()
    patch.setattr(
        precision, "detect_hardware", lambda cuda=False: precision.Hardware(precision.cpu_capability(), False)
    )
    yield
    patch.undo()
