"""TreeRPOConfig: defaults from settings.py, documentation of every field, validation naming the field,
YAML."""

from pathlib import Path

import pytest

from rllib_treerpo.config.settings import FIELDS
from rllib_treerpo.rllib.algorithm import TreeRPOConfig

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_defaults_are_the_embedded_cpu_default_and_the_paper_is_a_file():
    """The class defaults are configs/tiny_arith.yaml's settings (what `make train` runs); the paper's are a
    file."""
    from rllib_treerpo.jobs.config import flat_config, load_run_config

    default_config, default_job, _ = load_run_config(None)
    shipped = flat_config(*load_run_config(CONFIGS[0].parent / "tiny_arith.yaml")[:2])
    defaults = flat_config(default_config, default_job)
    assert {k: v for k, v in shipped.items() if defaults.get(k) != v} == {}
    c = TreeRPOConfig()
    assert (c.branching, c.step_tokens, c.tau) == ([4, 4, 4], 16, 0.1)
    assert (c.advantage_std, c.value_estimate, c.loss_agg, c.kl_estimator) == (
        "group",
        "child_mean",
        "token_mean",
        "k3",
    )
    paper, paper_job, _ = load_run_config(CONFIGS[0].parent / "paper_qwen25_math_1p5b_treerpo.yaml")
    assert (paper.branching, paper.step_tokens, paper.tau, paper.dtype) == ([8, 8, 8], 384, 0.1, "bfloat16")
    assert (
        paper.model_name_or_path == "Qwen/Qwen2.5-Math-1.5B" and paper.num_learners > 0 and paper.kl_coef > 0
    )
    grpo = load_run_config(CONFIGS[0].parent / "paper_qwen25_math_1p5b_grpo.yaml")[0]
    assert grpo.branching == [8] and grpo.tree_spec().response_tokens == paper.tree_spec().response_tokens


def test_every_field_is_documented():
    for name, field in FIELDS.items():
        assert len(field.doc.split()) >= 3, f"field {name!r} has no real documentation"
        assert field.check(field.default) is None or field.default is None, name


def test_defaults_are_not_shared_between_configs():
    a, b = TreeRPOConfig(), TreeRPOConfig()
    a.branching.append(2)
    a.env_config["num_ops"] = 9
    assert b.branching == [4, 4, 4] and b.env_config == {}


@pytest.mark.parametrize(
    "field, value",
    [
        ("branching", []),
        ("branching", [4, 0]),
        ("step_tokens", 0),
        ("tau", -0.1),
        ("advantage_std", "batch"),
        ("value_estimate", "max"),
        ("kl_estimator", "k5"),
        ("loss_agg", "sum"),
        ("top_p", 0.0),
        ("temperature", 0),
        ("dtype", "float16"),
        ("backend", "tgi"),
        ("prompts_per_iteration", 2.5),
        ("num_epochs", 0),
        ("num_minibatches", 0),
        ("pack_tokens", 0),
        ("forward_tokens", 0),
        ("packing", "yes"),
        ("gpu_memory_utilization", 0),
        ("gpu_memory_utilization", 1.5),
        ("max_model_len", 0),
        ("enable_sleep_mode", "yes"),
        ("release_after_sampling", 1),
        ("tis_cap", 0),
    ],
)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"'{field}'"):
        TreeRPOConfig.from_yaml(None, {field: value})


def test_unknown_key_is_named_with_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("branchings: [2, 2]\n")
    with pytest.raises(ValueError, match=r"unknown config field 'branchings'.*'branching'"):
        TreeRPOConfig.from_yaml(path)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("branching: [2, 3]\ntau: 0.2\nlr: 0.001\nenv_config: {num_ops: 2}\n")
    c = TreeRPOConfig.from_yaml(path, {"tau": 0.0})
    assert c.branching == [2, 3] and c.tau == 0.0 and c.lr == 0.001 and c.env_config == {"num_ops": 2}


def test_training_method_sets_fields():
    c = TreeRPOConfig().training(tau=0.3, branching=[4], lr=0.01)
    assert c.tau == 0.3 and c.branching == [4] and c.lr == 0.01


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_and_validates(path):
    c = TreeRPOConfig.from_yaml(path)
    assert c.to_flat_dict()["branching"] == c.branching


def test_rllib_minibatch_size_is_refused_for_treerpo_with_the_field_to_use():
    from rllib_treerpo.jobs.config import load_run_config

    with pytest.raises(ValueError, match="'minibatch_size' = 100: .* set num_minibatches"):
        load_run_config(None, {"minibatch_size": 100})
    config, job, _ = load_run_config(None, {"minibatch_size": 100, "algorithm": "PPO"})  # PPO's own field
    assert config.minibatch_size == 100 and job.algorithm == "PPO"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"backend": "vllm", "top_k": 20}, "backend"),
        ({"backend": "vllm", "top_p": 0.9}, "backend"),
        ({"backend": "vllm", "temperature": 2.5}, "backend"),
        (
            {
                "backend": "vllm",
                "num_env_runners": 2,
                "num_gpus_per_env_runner": 1,
                "create_local_env_runner": True,
            },
            "create_local_env_runner",
        ),
        ({"num_env_runners": 0, "create_local_env_runner": False}, "create_local_env_runner"),
        ({"tis_cap": 2.0, "num_minibatches": 2}, "tis_cap"),
        ({"tis_cap": 2.0, "num_epochs": 2}, "tis_cap"),
    ],
)
def test_vllm_and_tis_constraints_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        TreeRPOConfig.from_yaml(None, overrides)


def test_a_local_env_runner_only_when_it_samples():
    """null (the default): the driver builds a local env runner only when there are no remote ones."""
    for runners, local in ((0, True), (2, False)):
        config = TreeRPOConfig.from_yaml(None, {"num_env_runners": runners})
        assert config.create_local_env_runner is None
        config.preflight()  # validate() without the embedded model's warm start
        assert config.create_local_env_runner is local
    explicit = TreeRPOConfig.from_yaml(None, {"num_env_runners": 2, "create_local_env_runner": True})
    explicit.preflight()
    assert explicit.create_local_env_runner is True


def test_backend_kwargs():
    assert TreeRPOConfig().backend_kwargs() == {"max_batch": 512}
    assert TreeRPOConfig.from_yaml(
        None, {"num_gpus_per_env_runner": 0.5, "generation_batch": 64}
    ).backend_kwargs() == {"max_batch": 64, "device": "cuda"}
    vllm = {"backend": "vllm", "gpu_memory_utilization": 0.3, "max_model_len": 512, "enable_sleep_mode": True}
    assert TreeRPOConfig.from_yaml(None, {**vllm, "seed": 3}).backend_kwargs() == {
        "gpu_memory_utilization": 0.3,
        "max_model_len": 512,
        "enable_sleep_mode": True,
        "enforce_eager": False,
        "seed": 3,
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_as_a_run(path):
    """The job's loader too (it adds the algorithm's batching checks and the job fields)."""
    from rllib_treerpo.jobs.config import load_run_config

    config, job, _ = load_run_config(path)
    assert job.iterations > 0 and config.branching


def test_fields_doc_is_current():
    """docs/fields.md is what `treerpo fields` prints: a field added or changed in settings.py shows up
    there."""
    from pathlib import Path

    from rllib_treerpo.config.config_files import fields_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "fields.md"
    assert doc.read_text() == fields_markdown(), "run `treerpo fields > docs/fields.md`"
    assert "| `mixed_precision` |" in doc.read_text() and "| `eval_every` |" in doc.read_text()


def test_fields_are_declared_typed_and_training_takes_each_as_a_typed_keyword():
    """One declaration (settings.py): each field annotated there, a keyword of training() with the same type,
    and the default a fresh config starts with; RLlib's attributes take TreeRPO's declared defaults too."""
    import inspect

    from rllib_treerpo.config.settings import RLLIB_FIELD_CHECKS, RLlibSettings, TreeRPOSettings

    annotations = TreeRPOSettings.__annotations__
    assert set(annotations) == set(FIELDS)
    params = inspect.signature(TreeRPOConfig.training).parameters
    keywords = {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {n: p.annotation for n, p in keywords.items()} == annotations
    config = TreeRPOConfig()
    for name, field in {**FIELDS, **RLLIB_FIELD_CHECKS}.items():
        assert getattr(config, name) == field.default, name
    assert set(RLlibSettings.__annotations__) == set(RLLIB_FIELD_CHECKS)


def test_job_config_starts_from_the_declared_defaults():
    from rllib_treerpo.config.settings import JOB_FIELDS, JobSettings
    from rllib_treerpo.jobs.config import JobConfig

    job = JobConfig(iterations=3)
    assert job.iterations == 3 and set(JobSettings.__annotations__) == set(JOB_FIELDS)
    assert {k: v for k, v in job.to_flat_dict().items() if k != "iterations"} == {
        k: f.default for k, f in JOB_FIELDS.items() if k != "iterations"
    }
