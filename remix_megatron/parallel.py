"""torch.distributed and Megatron parallel state, built once and described by one object.

This is the only module that touches Megatron's global ``parallel_state``; everything else
receives a ``ParallelState`` (ranks, sizes, process groups) as an argument, and passes its
``pg_collection`` on to the Megatron constructors and schedules that accept one. What inside
megatron-core still reads the globals is listed in ``compat.GLOBAL_PARALLEL_STATE_READERS``.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from remix_megatron.compat import check_megatron_version
from remix_megatron.config import ConfigError, ExperimentConfig, ParallelConfig, validate_layout

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Hardware-dependent choices resolved from ``ParallelConfig``'s 'auto' values."""

    device: torch.device
    backend: str  # gloo | nccl
    params_dtype: torch.dtype
    transformer_impl: str  # local | transformer_engine
    # precision=bf16 on CPU: fp32 parameters (megatron-core's CPU forward fails with bf16 ones), model forwards
    # under torch.autocast("cpu", bfloat16); None = no autocast (fp32 on CPU, bf16 parameters on GPU)
    autocast_dtype: torch.dtype | None = None


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_runtime(cfg: ParallelConfig, *, cuda_available: bool | None = None) -> Runtime:
    """Turn 'auto' into concrete choices for this machine and reject impossible ones."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs; use parallel.backend=gloo (or auto) on CPU")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    impl = cfg.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if cuda and transformer_engine_installed() else "local"
    if impl == "transformer_engine" and not (cuda and transformer_engine_installed()):
        raise ConfigError("parallel.transformer_impl=transformer_engine needs CUDA GPUs and the "
                          "transformer-engine package (pip install -e '.[gpu]'); use 'local' on CPU")
    if cfg.sequence_parallel and impl == "local":
        raise ConfigError("parallel.sequence_parallel=true needs the TransformerEngine layer spec "
                          "(megatron's local spec norm rejects it); set it false or use transformer_engine")
    return Runtime(device=torch.device("cuda" if cuda else "cpu"), backend=backend,
                   params_dtype=torch.bfloat16 if precision == "bf16" and cuda else torch.float32,
                   transformer_impl=impl, autocast_dtype=torch.bfloat16 if precision == "bf16" and not cuda else None)


@dataclass(frozen=True, kw_only=True)
class ParallelState:
    """This rank's place in the TP x PP x DP grid and the process groups it talks over."""

    rank: int
    world_size: int
    local_rank: int
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline: int
    data_parallel: int
    sequence_parallel: bool
    tp_rank: int
    pp_rank: int
    dp_rank: int
    runtime: Runtime
    tp_group: dist.ProcessGroup = field(repr=False)
    pp_group: dist.ProcessGroup = field(repr=False)
    dp_group: dist.ProcessGroup = field(repr=False)
    # Megatron's groups for GPTModel, DDP, the optimizer and the schedules (None where no
    # Megatron model is built, e.g. an inference engine's stand-alone state)
    pg_collection: ProcessGroupCollection | None = field(repr=False)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_parallel - 1

    def chunk_is_first(self, vp_stage: int) -> bool:
        """Whether model chunk ``vp_stage`` of this rank holds the embedding."""
        return self.is_first_stage and vp_stage == 0

    def chunk_is_last(self, vp_stage: int) -> bool:
        """Whether model chunk ``vp_stage`` of this rank holds the output layer."""
        return self.is_last_stage and vp_stage == self.virtual_pipeline - 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tensor_parallel} "
                f"pp {self.pp_rank}/{self.pipeline_parallel} dp {self.dp_rank}/{self.data_parallel} "
                f"({self.runtime.backend}, {self.runtime.device.type}, {self.runtime.params_dtype}"
                f"{', autocast ' + str(self.runtime.autocast_dtype) if self.runtime.autocast_dtype else ''})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size_from_env() -> int:
    """World size as torchrun/Slurm-launched ranks see it; 1 for a plain ``python`` run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group_backend(backend: str) -> str:
    """The backend string for ``init_process_group``. With NCCL, host tensors (the loop's counters,
    flags and metric statistics) go over gloo and device tensors over NCCL: NCCL alone refuses
    CPU tensors, and a gloo-only run (CPU) already takes both."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def _start_process_group(runtime: Runtime, timeout_s: int) -> None:
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = process_group_backend(runtime.backend)
    if "RANK" in os.environ:  # torchrun (or srun + torchrun): env:// rendezvous
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if runtime.device.type == "cuda":
            # one hardware queue keeps TP communication ahead of the compute that follows it (what
            # megatron-core's layers recommend with TP > 1); read when the CUDA context is created
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a single process started with plain python
        if runtime.device.type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1, timeout=timeout)


def _pg_collection(tp_group: dist.ProcessGroup, pp_group: dist.ProcessGroup, dp_group: dist.ProcessGroup
                   ) -> ProcessGroupCollection:
    """The groups megatron-core 0.16.1 takes explicitly, from its initialised global ``parallel_state``.

    The same groups its constructors would otherwise fetch themselves (so passing them changes
    nothing numerically). No context parallelism: ``cp`` holds one rank, ``dp_cp`` the ranks of ``dp``.
    DDP and the optimizer require the expert groups and ``intra_dist_opt`` even for a dense
    model (DDP would otherwise create a one-rank expert group on every rank).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(
        tp=tp_group, pp=pp_group, dp=dp_group, mp=mpu.get_model_parallel_group(),
        dp_cp=mpu.get_data_parallel_group(with_context_parallel=True), cp=mpu.get_context_parallel_group(),
        embd=mpu.get_embedding_group(check_initialized=False),
        pos_embd=mpu.get_position_embedding_group(check_initialized=False),
        ep=mpu.get_expert_model_parallel_group(), expt_dp=mpu.get_expert_data_parallel_group(),
        tp_ep_pp=mpu.get_expert_tensor_model_pipeline_parallel_group(),
        intra_dist_opt=mpu.get_intra_distributed_optimizer_instance_group(),
    )


def init_parallel(cfg: ExperimentConfig) -> ParallelState:
    """Validate the layout for this world size, start torch.distributed and Megatron's groups.

    Seeds torch's and Megatron's model-parallel RNGs from ``cfg.trainer.seed``.
    """
    par = cfg.parallel
    validate_layout(cfg, world_size_from_env())
    runtime = resolve_runtime(par)
    check_megatron_version()
    if runtime.device.type == "cpu":
        from remix_megatron.compat.cpu import install_cpu_adapter

        install_cpu_adapter()
    if not dist.is_initialized():
        _start_process_group(runtime, par.collective_timeout_s)
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    mpu.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline if par.virtual_pipeline > 1 else None,
        distributed_timeout_minutes=max(1, par.collective_timeout_s // 60),
    )
    torch.manual_seed(cfg.trainer.seed)
    model_parallel_cuda_manual_seed(cfg.trainer.seed)
    tp_group, pp_group = mpu.get_tensor_model_parallel_group(), mpu.get_pipeline_model_parallel_group()
    dp_group = mpu.get_data_parallel_group()
    return ParallelState(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tensor_parallel=par.tensor_parallel, pipeline_parallel=par.pipeline_parallel,
        virtual_pipeline=par.virtual_pipeline, data_parallel=mpu.get_data_parallel_world_size(),
        sequence_parallel=par.sequence_parallel,
        tp_rank=mpu.get_tensor_model_parallel_rank(), pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(), runtime=runtime,
        tp_group=tp_group, pp_group=pp_group, dp_group=dp_group,
        pg_collection=_pg_collection(tp_group, pp_group, dp_group),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
