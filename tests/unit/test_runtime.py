"""Resolving 'auto' hardware choices and rejecting impossible ones, with and without CUDA."""

import pytest
import torch

from remix_megatron.config import ConfigError, ParallelConfig
from remix_megatron.parallel import process_group_backend, resolve_runtime

pytestmark = pytest.mark.unit


def test_auto_on_cpu():
    rt = resolve_runtime(ParallelConfig(), cuda_available=False)
    assert (rt.device.type, rt.backend, rt.params_dtype, rt.transformer_impl) == ("cpu", "gloo", torch.float32, "local")
    assert rt.autocast_dtype is None  # fp32 throughout, as the exactness tests need


def test_bf16_on_cpu_is_autocast_over_fp32_weights():
    rt = resolve_runtime(ParallelConfig(precision="bf16"), cuda_available=False)
    assert (rt.params_dtype, rt.autocast_dtype) == (torch.float32, torch.bfloat16)
    assert resolve_runtime(ParallelConfig(precision="fp32"), cuda_available=False).autocast_dtype is None


def test_auto_on_gpu(monkeypatch):
    monkeypatch.setattr("remix_megatron.parallel.transformer_engine_installed", lambda: True)
    rt = resolve_runtime(ParallelConfig(), cuda_available=True)
    assert (rt.device.type, rt.backend, rt.params_dtype, rt.transformer_impl) == (
        "cuda", "nccl", torch.bfloat16, "transformer_engine")
    assert rt.autocast_dtype is None  # bf16 parameters with Megatron's mixed-precision optimizer instead


def test_gpu_without_transformer_engine_falls_back_to_local(monkeypatch):
    monkeypatch.setattr("remix_megatron.parallel.transformer_engine_installed", lambda: False)
    assert resolve_runtime(ParallelConfig(), cuda_available=True).transformer_impl == "local"


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(backend="nccl"), "backend=nccl needs CUDA"),
    (dict(transformer_impl="transformer_engine"), "needs CUDA GPUs and the transformer-engine package"),
    (dict(tensor_parallel=2, sequence_parallel=True), "sequence_parallel=true needs the TransformerEngine"),
])
def test_impossible_choices_on_cpu(kwargs, expected):
    with pytest.raises(ConfigError, match=expected):
        resolve_runtime(ParallelConfig(**kwargs), cuda_available=False)


def test_nccl_runs_also_take_host_tensors_over_gloo():
    assert process_group_backend("gloo") == "gloo"
    assert process_group_backend("nccl") == "cpu:gloo,cuda:nccl"
    # torch accepts the string and maps each device type to its backend
    config = torch.distributed.distributed_c10d.BackendConfig(
        torch.distributed.Backend(process_group_backend("nccl")))
    assert config.get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
