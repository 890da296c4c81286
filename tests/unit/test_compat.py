"""The CPU adapter: a no-op with CUDA, idempotent, and it makes megatron's CUDA calls work."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
