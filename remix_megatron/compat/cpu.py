"""Adapter that lets megatron-core 0.16.x run unchanged on a CPU-only torch (gloo backend).

megatron-core hard-codes CUDA in places that a CPU run reaches:
  * ``torch.cuda.current_device()`` as a tensor device (tensor_parallel layers, mappings,
    the global memory buffer, p2p communication);
  * ``device="cuda"``, ``tensor.cuda()`` and ``tensor.to("cuda")`` (the pipeline schedules'
    token counter, tensor_parallel.data, ...);
  * CUDA RNG state in the model-parallel RNG tracker;
  * ``torch.cuda.synchronize`` / ``set_device``;
  * ``param.type() == "torch.cuda.FloatTensor"`` checks in grad clipping and the optimizers.

``install_cpu_adapter`` rewrites exactly these to CPU. It does nothing when CUDA is present,
and installing twice is the same as installing once. It is the only place in the project
that special-cases CPU (see ../../README.md, "CPU and GPU").
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_installed = False


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call made while it is active.

    Also makes ``Tensor.type()`` (no arguments) report ``torch.cuda.*`` for CPU tensors:
    megatron's optimizers and grad clipping assert on that string, and nothing else in the
    project reads it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the process passes here: the common case (no device argument,
        # not one of the three rewritten methods) must cost as little as possible.
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs = {**kwargs, "device": "cpu"}
        else:
            kwargs = {}
        if func is not torch.Tensor.to and func is not torch.Tensor.cuda and func is not torch.Tensor.type:
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def is_cpu_adapter_installed() -> bool:
    """True once ``install_cpu_adapter`` has patched torch in this process."""
    return _installed


def install_cpu_adapter() -> bool:
    """Make megatron-core's CUDA calls run on CPU. Returns True if the adapter is active.

    A no-op (returning False) when CUDA is available; idempotent otherwise.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    with _lock:
        if _installed:
            return True
        # Expected on the CPU path, printed once per rank and module otherwise.
        warnings.filterwarnings("ignore", message=r".*(Apex is|Transformer Engine and Apex are) not installed")
        # Megatron warns unless this is 1 (it orders CUDA kernels for async TP all-reduce;
        # meaningless on CPU, where there are no CUDA streams).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        cuda = torch.cuda
        cuda.current_device = lambda: torch.device("cpu")
        cuda.synchronize = lambda *args, **kwargs: None
        cuda.set_device = lambda *args, **kwargs: None
        cuda.empty_cache = lambda: None
        cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        cuda.manual_seed = lambda seed: torch.manual_seed(seed)
        from megatron.core.tensor_parallel import random as megatron_random

        megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        # Entered for the life of the process: megatron creates CUDA tensors from many call
        # sites, and a mode scoped to our own calls would miss the pipeline schedules' ones.
        _CudaToCpuMode().__enter__()
        _installed = True
    return True
