"""The house in layers (docs/architecture.md): the core runs without Ray, imports point down, files and
functions stay small.

Layers, lowest first: the Ray-free core (rllib_treerpo/core: the pure math; sampling/, learner/, models/,
config/, generation/; and the envs package), the RLlib adapters (rllib_treerpo/rllib), then the jobs
(rllib_treerpo/jobs) beside the baselines (rllib_treerpo/baselines: a baseline is a job for another
algorithm). A module may import its own layer and the layers below it, never one above (function-level imports
included). The package's __init__ is the facade above them all (it registers TreeRPO). rllib_treerpo/core
imports no other project module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rllib_treerpo", "envs")
LAYERS = {"core": 0, "rllib": 1, "jobs": 2, "baselines": 2}
FACADE = 9


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    if module == "rllib_treerpo":
        return FACADE
    return LAYERS.get(parts[1], 0) if parts[0] == "rllib_treerpo" else 0


def imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """The project modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    known = modules()
    return {name for name in found if name in known}


CORE = [m for m in modules() if layer(m) == 0] + [
    "rllib_treerpo"
]  # the facade too: it registers only with Ray


def test_core_imports_and_runs_without_ray():
    """Every core module imports where Ray cannot (the GPU image has no Ray), and a tree is sampled."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        f"import importlib; [importlib.import_module(m) for m in {CORE!r}]\n"
        "from rllib_treerpo.models.tiny import build_char_tokenizer, build_tiny_model\n"
        "from rllib_treerpo.generation import make_backend\n"
        "from rllib_treerpo.sampling.sampler import TreeSpec, sample_iteration\n"
        "from envs import ArithmeticEnv\n"
        "tok = build_char_tokenizer()\n"
        "model = build_tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, "
        "intermediate_size=64)\n"
        "trees = sample_iteration(ArithmeticEnv(num_ops=1), make_backend('hf', model, tok), tok, "
        "TreeSpec((2, 2), 4),"
        " 2, seed=0)\n"
        "assert len(trees) == 2 and 'ray' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_math_core_imports_nothing_else_of_the_project():
    """rllib_treerpo/core (trees, advantages, the objective) is numpy and torch only: it can be read alone."""
    bad = [
        f"{m} imports {i}"
        for m, path in modules().items()
        if m.startswith("rllib_treerpo.core")
        for i in imports(path, m, top_level_only=False)
        if not i.startswith("rllib_treerpo.core")
    ]
    assert not bad, bad


def test_imports_point_down_the_layers():
    bad = [
        f"{m} (layer {layer(m)}) imports {i} (layer {layer(i)})"
        for m, path in modules().items()
        for i in imports(path, m, top_level_only=False)
        if layer(i) > layer(m)
    ]
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: imports(p, m, top_level_only=True) - {m} for m, p in modules().items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1 and not m.startswith(
                n + "."
            ):  # a package importing its own submodule is fine
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("folder", ["rllib_treerpo", "envs", "benchmarks"])
def test_files_and_functions_stay_small(folder):
    """Files under 400 lines, functions under 80 (STYLE.md: split by responsibility past that)."""
    too_big = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_big.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.end_lineno - node.lineno + 1 > 80
            ):
                too_big.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                    f"{node.end_lineno - node.lineno + 1} lines"
                )
    assert not too_big, too_big
