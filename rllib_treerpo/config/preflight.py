"""The run against this machine, checked before anything expensive (warm start, Ray start-up, model load).
Ray-free.

Every entry point (`treerpo train`, `TreeRPOConfig.build_algo()`, `tune.run("TreeRPO")`) calls
:func:`preflight` (through ``TreeRPOConfig.preflight``, after the values are checked) with the algorithm's
settings and the held-out env's config, so a misfit fails in seconds with one line naming the field: the
backend's package, a local model path that cannot be a model, the env id and its arguments, the tree deeper
than the env's step limit, a model with sliding-window layers, and the longest prompt plus the response budget
(depth x step_tokens) against the model's window.
"""

from __future__ import annotations

from typing import Any

PROMPTS_CHECKED = 32  # problems per env whose prompt lengths are measured


def preflight(
    config: Any,
    eval_env_config: dict | None = None,
    tiny_model: dict | None = None,
    *,
    model_path_is_local: bool = True,
) -> int | None:
    """ValueError naming the field when ``config`` (a TreeRPOConfig or anything with its fields) cannot run
    here; returns the longest sequence the run needs with a prompt budget of twice the longest prompt
    measured, at most the model's window (the vllm backend's default max_model_len; None when the model cannot
    be read).

    ``tiny_model``: the embedded model's architecture when ``model_name_or_path`` is null (its window).
    ``model_path_is_local``: false on a cluster of several nodes, where a model path may exist on other nodes
    only.
    """
    from envs import make_reasoning_env
    from rllib_treerpo.models.model_io import check_model_config, check_model_path

    if config.backend == "vllm":  # before a runner starts, let alone loads a model (cheap: no import)
        from rllib_treerpo.generation.vllm import require_vllm

        require_vllm()
    if model_path_is_local:
        check_model_path(config.model_name_or_path)

    spec = config.tree_spec()
    envs = {"env_config": make_reasoning_env(config.env, config.env_config)}
    if eval_env_config is not None:
        envs["eval_env_config"] = make_reasoning_env(
            config.env, {**config.env_config, **eval_env_config}, field="eval_env_config"
        )
    for field, env in envs.items():
        max_steps = getattr(env, "max_steps", None)
        if max_steps is not None and max_steps < spec.depth:
            raise ValueError(
                f"config field 'branching' = {list(spec.branching)}: a tree of depth {spec.depth} is deeper "
                f"than the env allows (its max_steps = {max_steps}; raise it in {field} or use fewer levels)"
            )
    check_model_config(config.model_name_or_path)
    tokenizer, window = _tokenizer_and_window(config.model_name_or_path, tiny_model)
    if window is None:
        return None
    from rllib_treerpo.sampling.prompts import prompt_tokenizer

    tok = prompt_tokenizer(tokenizer, chat_template=config.chat_template, system_prompt=config.system_prompt)
    longest_of_all = 0
    for field, env in envs.items():
        longest, problem = _longest_prompt(env, tok)
        longest_of_all = max(longest_of_all, longest)
        if longest + spec.response_tokens > window:
            raise ValueError(
                f"config field 'step_tokens' = {spec.step_tokens}: a prompt of {longest} tokens ({field} "
                f"problem {problem!r}) + depth {spec.depth} x step_tokens {spec.step_tokens} = "
                f"{longest + spec.response_tokens} > the model window {window}; use shorter steps or "
                "fewer levels"
            )
        engine_len = config.max_model_len if config.backend == "vllm" else None
        if engine_len is not None and longest + spec.response_tokens > engine_len:
            raise ValueError(
                f"config field 'max_model_len' = {engine_len}: a prompt of {longest} tokens ({field} problem "
                f"{problem!r}) + depth {spec.depth} x step_tokens {spec.step_tokens} = "
                f"{longest + spec.response_tokens} does not fit; raise it (null: what the run needs)"
            )
    return min(window, 2 * longest_of_all + spec.response_tokens)


def _tokenizer_and_window(model_name_or_path: str | None, tiny_model: dict | None) -> tuple[Any, int | None]:
    """The tokenizer and the longest sequence of the model, read without its weights (None when unknown)."""
    if model_name_or_path is None:  # the embedded model: the character tokenizer, the tiny model's window
        from rllib_treerpo.models.tiny import build_char_tokenizer

        return build_char_tokenizer(), int((tiny_model or {}).get("max_positions", 512))
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    local = Path(model_name_or_path).expanduser().is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, local_files_only=not local)
        config = AutoConfig.from_pretrained(model_name_or_path, local_files_only=not local)
    except (OSError, ValueError, KeyError) as e:
        if local:
            raise ValueError(
                f"config field 'model_name_or_path' = {model_name_or_path!r}: not a loadable model folder "
                f"({str(e).splitlines()[0]})"
            ) from None
        return None, None  # a hub name not cached here: the model load reports it
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return tokenizer, getattr(text, "max_position_embeddings", None)


def _longest_prompt(env: Any, tokenizer: Any) -> tuple[int, str]:
    """Tokens of the longest prompt among the env's first problems (indexed envs) or seeded draws."""
    longest = 0
    problem = ""
    for i in range(PROMPTS_CHECKED):
        probe = env.clone()
        try:
            prompt, info = probe.reset(options={"problem_index": i})
        except (IndexError, KeyError):
            break  # fewer problems than that
        except TypeError:
            prompt, info = probe.reset(seed=i)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > longest:
            longest = n
            problem = str(info.get("problem_id", i))
    return longest, problem
