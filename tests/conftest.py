"""Shared fixtures: a tiny random causal LM saved to disk (no downloads) and one Ray session; `slow` tests run only
with ``pytest --run-slow``."""

import pytest


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
    from rllib_treerpo.tiny import build_char_tokenizer, build_tiny_model

    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=256
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs actors (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
