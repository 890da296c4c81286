"""The CPU adapter: a no-op with CUDA, idempotent, and it makes megatron's CUDA calls work."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the adapter patches torch process-wide)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip()


def test_noop_when_cuda_is_available():
    out = run_python("""
        import torch
        torch.cuda.is_available = lambda: True          # simulate a GPU machine
        before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state)
        from remix_megatron.compat.cpu import install_cpu_adapter, is_cpu_adapter_installed
        from megatron.core.tensor_parallel import random as mr
        rng_before = mr._get_cuda_rng_state
        print(install_cpu_adapter(), is_cpu_adapter_installed(),
              before == (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state),
              mr._get_cuda_rng_state is rng_before, torch.overrides._get_current_function_mode() is None)
    """)
    assert out == "False False True True True"


def test_idempotent_and_effective_on_cpu():
    out = run_python("""
        import torch
        from torch.overrides import _get_current_function_mode_stack
        from remix_megatron.compat.cpu import install_cpu_adapter
        assert install_cpu_adapter()
        first = (torch.cuda.current_device, len(_get_current_function_mode_stack()))
        assert install_cpu_adapter()
        second = (torch.cuda.current_device, len(_get_current_function_mode_stack()))
        t = torch.zeros(2, device="cuda")
        moved = torch.ones(1).cuda().to("cuda")
        x = torch.ones(3)
        print(first == second, first[1], t.device.type, moved.device.type, torch.cuda.current_device(),
              x.type(), x.double().type(), x.type(torch.float64).dtype)
    """)
    assert out == "True 1 cpu cpu cpu torch.cuda.FloatTensor torch.cuda.DoubleTensor torch.float64"


def test_megatron_rng_tracker_runs_on_cpu():
    out = run_python("""
        import torch
        from remix_megatron.compat.cpu import install_cpu_adapter
        install_cpu_adapter()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("test-rng", 42)
        torch.manual_seed(0)
        with tracker.fork("test-rng"):
            a = torch.rand(3)
        outside = torch.rand(3)
        torch.manual_seed(42)
        expected = torch.rand(3)
        torch.manual_seed(0)
        print(torch.equal(a, expected), torch.equal(outside, torch.rand(3)))
    """)
    assert out == "True True"


def test_version_check_warns_on_mismatch(monkeypatch):
    import importlib.metadata

    from remix_megatron import compat

    assert compat.check_megatron_version() == compat.MEGATRON_CORE_VERSION
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.warns(UserWarning, match="megatron-core 0.99.0 is installed"):
        compat.check_megatron_version()


def test_transformer_config_adaptations():
    from remix_megatron.compat import transformer_config_adaptations

    cpu = transformer_config_adaptations(device_type="cpu", backend="gloo")
    assert cpu["use_cpu_initialization"] and not cpu["batch_p2p_comm"] and not cpu["masked_softmax_fusion"]
    assert transformer_config_adaptations(device_type="cuda", backend="nccl") == {}


def _resolve(dotted: str):
    """The object a dotted name (module path, then attributes) names."""
    import importlib

    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_documented_global_readers_are_megatron_functions_that_call_them():
    """Each entry of GLOBAL_PARALLEL_STATE_READERS (traced by tests/distributed/test_process_groups.py)
    names a function of the installed megatron-core whose source calls the parallel_state functions listed."""
    import inspect

    from remix_megatron.compat import GLOBAL_PARALLEL_STATE_READERS

    assert GLOBAL_PARALLEL_STATE_READERS
    for reader, (names, why) in GLOBAL_PARALLEL_STATE_READERS.items():
        assert reader.startswith("megatron.core.") and why, reader
        source = inspect.getsource(_resolve(reader))
        assert all(name in source for name in names), (reader, names)


def _imports_parallel_state(node) -> bool:
    if isinstance(node, ast.ImportFrom) and node.module:
        return node.module.startswith("megatron.core.parallel_state") or (
            node.module == "megatron.core" and any(alias.name == "parallel_state" for alias in node.names))
    return isinstance(node, ast.Import) and any(a.name.startswith("megatron.core.parallel_state") for a in node.names)


def test_only_parallel_py_imports_megatron_parallel_state():
    """STYLE.md 4: every other module gets its groups from a ParallelState."""
    package = REPO / "remix_megatron"
    others = [path for path in sorted(package.rglob("*.py")) if path != package / "parallel.py"]
    offenders = [str(path.relative_to(REPO)) for path in others
                 if any(map(_imports_parallel_state, ast.walk(ast.parse(path.read_text()))))]
    assert offenders == []
