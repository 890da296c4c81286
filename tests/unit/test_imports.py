"""Imports flow one way (STYLE.md 1) and heavy optional packages stay lazy (STYLE.md 7)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

PACKAGE = REPO / "remix_megatron"
# A module may import from its own layer or lower ones, never higher.
LAYERS = {
    "registry": 0, "fileio": 0, "faults": 0, "glossary": 0, "families": 1, "config": 1, "compat": 1, "parallel": 2,
    "stopping": 2, "models": 3, "evaluation": 4, "algorithms": 4, "store": 4, "checkpoint": 4, "rollout": 4,
    "convert": 4, "rewards": 4, "data": 4, "batching": 4, "policies": 4, "updates": 4, "rundir": 4, "metrics_log": 4,
    "console": 4, "planning": 4, "validation": 4, "trainer": 5, "smoke": 5, "sweep": 6, "cli": 7,
}
# Imported only inside the functions that use them, never at module level.
GPU_ONLY = ("transformer_engine", "vllm", "sglang", "apex")


def _component(module_path) -> str:
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path, *, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_every_component_has_a_layer():
    components = {_component(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert components <= set(LAYERS), f"add {components - set(LAYERS)} to LAYERS"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_flow_one_way(path):
    if path.parent == PACKAGE and path.name == "__init__.py":
        return
    own = LAYERS[_component(path)]
    for name in _imports(path):
        if name.startswith("remix_megatron."):
            target = name.split(".")[1]
            assert LAYERS[target] <= own, f"{path.name} ({own}) imports {name} (layer {LAYERS[target]})"
    for name in _imports(path, top_level_only=True):
        assert name.split(".")[0] not in GPU_ONLY, f"{path} imports GPU-only {name} at module level"


def test_import_is_cheap():
    """Importing the package, its config and CLI must not import megatron or GPU stacks."""
    code = ("import sys, remix_megatron, remix_megatron.config, remix_megatron.cli, remix_megatron.registry;"
            "print(sorted(m for m in ('megatron', 'transformer_engine', 'vllm', 'sglang', 'wandb') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


PURE = sorted(p for p in (PACKAGE / "algorithms").glob("*.py") if p.name not in ("megatron_adapter.py", "__init__.py"))


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_algorithms_are_pure_tensor_code(path):
    """Losses, advantages and schedules never touch torch.distributed, Megatron or models."""
    for name in _imports(path):
        assert not name.startswith(("torch.distributed", "megatron", "remix_megatron.models",
                                    "remix_megatron.parallel")), f"{path.name} imports {name}"


MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
                 if p.name != "__init__.py")


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    """A name that moved (or a stale import left by a merge) fails here, not at a command's first use."""
    import importlib

    importlib.import_module(module)


def test_test_file_names_are_unique():
    """pytest imports a test module outside a package by its basename (tests/unit and
    tests/distributed are not packages): two such files of one name stop the suite's collection."""
    from collections import Counter

    names = Counter(p.name for p in (REPO / "tests").rglob("test_*.py") if not (p.parent / "__init__.py").exists())
    assert not [name for name, count in names.items() if count > 1]
