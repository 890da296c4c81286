"""The only place that adapts to the hardware (CPU-only torch) or to library versions."""

from __future__ import annotations

import importlib.metadata
import warnings

# megatron-core 0.16.1 builds every TransformerConfig with its deprecated default
# cuda_graph_scope and warns about it; nothing we set triggers it.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")

#: The megatron-core release every adaptation in this package was written and tested against.
MEGATRON_CORE_VERSION = "0.16.1"


#: What inside megatron-core 0.16.1 still reads its global ``parallel_state`` although every
#: constructor and function that accepts our groups gets them (``ParallelState.pg_collection``:
#: GPTModel, DDP, get_megatron_optimizer, the forward-backward schedules and their
#: P2PCommunicator, finalize_model_grads through the schedules, sharded_state_dict's
#: ``dp_cp_group``, get_transformer_layer_offset's ``pp_rank``). Reader (module.function) ->
#: (the parallel_state functions it calls, why). Traced on the CPU path (local layer spec,
#: gloo) by tests/distributed/test_process_groups.py over building, training, optimizer steps,
#: forward passes, TP/PP sharding, export and checkpointing. Not counted there:
#: ``parallel_state.is_initialized()``, which megatron's group-or-default helper calls on every
#: use to see whether the globals exist; it reads no group and returns the group passed.
#: Also reading them, in parallel.py: ``model_parallel_cuda_manual_seed`` (seeds the TP/EP RNG
#: streams from the global ranks). The TransformerEngine spec (GPU) uses neither layer below;
#: what it reads is not traced here (no GPU).
GLOBAL_PARALLEL_STATE_READERS = {
    "megatron.core.tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce": (
        ("get_tensor_model_parallel_group",),
        "RowParallelLinear.forward passes tp_group=None (it reduces its output over its own group "
        "afterwards); the global group is fetched but unused, as that call asks for neither a dgrad "
        "all-reduce nor sequence parallelism"),
    "megatron.core.transformer.dot_product_attention.DotProductAttention.forward": (
        ("get_global_memory_buffer",),
        "the attention-score scratch buffer is process-wide; no argument replaces it"),
}


def check_megatron_version() -> str:
    """Return the installed megatron-core version, warning when it is not the pinned one."""
    installed = importlib.metadata.version("megatron-core")
    if installed != MEGATRON_CORE_VERSION:
        warnings.warn(f"megatron-core {installed} is installed; remix-megatron is tested with "
                      f"{MEGATRON_CORE_VERSION} (pip install megatron-core=={MEGATRON_CORE_VERSION})", stacklevel=2)
    return installed


def transformer_config_adaptations(*, device_type: str, backend: str) -> dict:
    """TransformerConfig settings that this hardware / backend needs, as keyword arguments.

    - CPU: initialise weights on CPU (TP shards then equal slices of the TP=1 weights for the
      same seed) and keep the fused kernels off (they need apex or CUDA).
    - gloo: no batched pipeline p2p. Batched send/recv posts both directions to the same peer
      at once, and gloo matches messages per peer in posting order; with PP=2 and the
      interleaved schedule the previous and next stage are the same rank, so activations and
      gradients of the same shape swap places (measured: wrong gradients, right forward).
      Megatron's unbatched path sends the two directions over different groups.
    """
    adaptations: dict = {}
    if device_type == "cpu":
        adaptations.update(use_cpu_initialization=True, masked_softmax_fusion=False,
                           bias_activation_fusion=False, bias_dropout_fusion=False)
    if backend == "gloo":
        adaptations.update(batch_p2p_comm=False)
    return adaptations


def distributed_optimizer_loads_into_torch_adam() -> None:
    """Let megatron-core 0.16.1's DistributedOptimizer load a checkpoint into torch's Adam (no Apex/TE).

    Two faults of its torch-Adam path, both in what it does with Adam's per-parameter ``step``
    (the step itself comes from the param groups; ``load_state_dict`` sets it just before):
    - its loaders copy the loaded ``param``/``exp_avg``/``exp_avg_sq`` into every entry of a
      parameter's Adam state, ``step`` included, which no loaded entry carries: KeyError 'step';
    - every parameter gets the same step tensor, which torch's Adam increments in place once
      per parameter: after one step the bias correction is that of step + (number of parameters)
      (measured: a resumed run left the uninterrupted one at its first step).
    Each parameter gets its own copy of the step, as an uninterrupted run has. Idempotent; a
    no-op with Apex/TE, whose fused Adam keeps no per-parameter step.
    """
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    original = optimizer_class._set_main_param_and_optimizer_states
    if distrib_optimizer.HAVE_APEX_OR_TE or getattr(original, "gives_own_step", False):
        return

    def set_states_with_own_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        adam_state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in adam_state and "step" not in tensors:
            adam_state["step"] = adam_state["step"].clone()
            tensors = {**tensors, "step": adam_state["step"]}
        original(self, model_param, tensors)

    set_states_with_own_step.gives_own_step = True
    optimizer_class._set_main_param_and_optimizer_states = set_states_with_own_step


def in_process_checkpoint_writes() -> None:
    """Keep megatron-core's synchronous dist-checkpoint saves inside the training process.

    At its first save, ``filesystem_async`` starts a multiprocessing Manager (a spawned server
    process, plus a resource_tracker) only to hold one results queue. torchrun and Slurm signal
    the whole process group, so a SIGTERM kills that server and the preemption checkpoint
    then dies in BrokenPipeError; a kill -9 of the worker leaves both processes orphaned. A
    synchronous save puts and gets the results in this process, so a plain queue does the
    same job with no helper process. Idempotent; the per-bucket writers megatron forks for
    one save stay (they inherit this process's signal handlers and exit when written).
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
