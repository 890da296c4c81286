"""Megatron DDP wrapping and optimizer construction for actor or critic chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remix_megatron.config import OptimizerConfig, ParallelConfig
from remix_megatron.parallel import ParallelState


@dataclass
class TrainableModel:
    """Model chunks wrapped in Megatron DDP, with the optimizer that steps them."""

    chunks: list[torch.nn.Module]  # DDP-wrapped, one per virtual pipeline stage
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def grads_finite(self) -> bool:
        """Whether every gradient on every rank is finite (a collective over the whole world)."""
        import torch.distributed as dist

        finite = torch.ones((), dtype=torch.float32)
        for chunk in self.chunks:
            for param in chunk.module.parameters():
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                if grad is not None and not torch.isfinite(grad).all():
                    finite.zero_()
                    break
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def step(self) -> tuple[bool, float | None]:
        """One optimizer step; returns (applied, grad norm before clipping).

        A step whose gradients hold NaN/inf anywhere is skipped on every rank (weights and
        optimizer moments untouched) and reported as ``(False, nan)``.
        """
        if not self.grads_finite():
            self.zero_grad()
            return False, float("nan")
        applied, grad_norm, _ = self.optimizer.step()
        return applied, grad_norm

    def adam_moment(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        """Adam's ``exp_avg`` / ``exp_avg_sq`` for a model parameter (fp32, non-distributed optimizer)."""
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for optimizer in optimizers:
            if param in optimizer.optimizer.state:
                return optimizer.optimizer.state[param][key]
        raise KeyError("no optimizer state for this parameter (bf16 or distributed optimizers keep it on "
                       "main-param copies)")

    def ensure_optimizer_state(self) -> None:
        """Give a distributed optimizer that has not stepped yet the Adam state of step 0 (zero moments).

        Without Apex/TE, megatron-core 0.16.1's DistributedOptimizer.state_dict reads the step from
        torch Adam's per-parameter state, which torch creates lazily at the first step: a sharded
        state dict of a fresh optimizer (every load, a save before any step) fails without it.
        """
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

        if HAVE_APEX_OR_TE:  # their fused Adam keeps its own state, without a per-parameter step
            return
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if not isinstance(optimizer, DistributedOptimizer) or optimizer.optimizer.state:
                continue
            for group in optimizer.optimizer.param_groups:
                for param in group["params"]:  # what torch.optim.Adam's first step allocates
                    optimizer.optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                                        "exp_avg_sq": torch.zeros_like(param)}

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (every parameter group)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def unwrapped(self) -> list[torch.nn.Module]:
        """The bare GPTModel chunks inside the DDP wrappers."""
        return [chunk.module for chunk in self.chunks]


def make_trainable(chunks: list[torch.nn.Module], optim: OptimizerConfig, parallel: ParallelConfig,
                   state: ParallelState) -> TrainableModel:
    """Wrap ``chunks`` in Megatron DDP and build Adam through ``get_megatron_optimizer``.

    Gradients are reduced in fp32 after the backward pass (no overlap: simplest and exact);
    the pipeline schedules call ``finalize_model_grads`` for the DP/embedding reductions.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk, pg_collection=state.pg_collection)
               for chunk in chunks]
    no_sync = [chunk.no_sync for chunk in wrapped]
    for chunk in wrapped:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    bf16 = state.runtime.params_dtype == torch.bfloat16
    megatron_config = MegatronOptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, fp16=False, params_dtype=state.runtime.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    # megatron-core rejects gloo DP groups together with a pg_collection; only optimizer-state
    # formats that gather over gloo use them (save_parameter_state, memory-efficient
    # fully_reshardable), not ours (fully_sharded_model_space).
    optimizer = get_megatron_optimizer(megatron_config, wrapped, use_gloo_process_groups=False,
                                       pg_collection=state.pg_collection)
    return TrainableModel(chunks=wrapped, optimizer=optimizer)
