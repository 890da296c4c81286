"""Dry-run planning: the parallel layout and a per-GPU memory estimate, without GPUs or processes.

Pure arithmetic on an ``ExperimentConfig`` (``remix-megatron dryrun`` prints it):

- **Layout** in Megatron's default rank order ``tp-cp-ep-dp-pp`` (context and expert parallel
  are 1 here): ``rank = tp_rank + TP * (dp_rank + DP * pp_rank)``, the group lists Megatron's
  ``RankGenerator`` builds, and the layers of each pipeline stage and virtual chunk (chunk v
  of stage p holds layers ``(v * PP + p) * L / (PP * VPP)`` onward, Megatron's interleaving).
- **Memory per GPU**, per pipeline stage, in bytes:
  - weights: parameters of this rank's shard x the parameter dtype (bf16 on GPU, fp32 on CPU);
  - gradients: Megatron DDP's fp32 ``main_grad`` buffer, 4 bytes per parameter;
  - Adam: exp_avg + exp_avg_sq in fp32 (8 bytes per parameter), plus an fp32 master copy
    (4 more) when parameters are bf16; divided by DP with the distributed optimizer;
  - activations of the training pass (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", counted for 16-bit activations and scaled by
    the activation dtype): per layer and micro-batch ``s*b*h*(10 + 24/t)`` bytes (with a token
    budget ``trainer.max_tokens_per_micro_batch``, ``s*b`` is the budget at ``s = seq_length``), or
    ``34*s*b*h/t`` with sequence parallelism, plus ``5*a*s^2*b/t`` for the attention scores
    when they are stored (Megatron's local spec; the TransformerEngine spec's fused/flash
    attention keeps none, as with selective recompute). No activation recompute. A stage keeps
    the micro-batches that 1F1B has in flight (``PP - p``, interleaved: Megatron's warm-up
    count + 1 model chunks). The actor's last stage adds the logits of one micro-batch:
    ``s*b*V/t`` x (dtype + two fp32 copies: the upcast logits and the softmax kept for backward).
    The SwiGLU MLP and GQA differ from the paper's GPT, so this is an estimate, not a bound;
  - the generation engine while awake: vLLM / SGLang reserve
    ``rollout.gpu_memory_utilization`` of the GPU for weights (bf16, split over TP) and KV cache;
    KV per token = ``2 * layers * kv_heads/TP * head_dim * 2`` bytes; the HF engine holds a full
    replica and the KV cache of every sequence it generates at once;
  - the reference and precedent policies (frozen actor copies, weights only) and, on GPU, a
    fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation.
  The engine is asleep while training, so the peak is the resident models plus the larger of
  the training activations and the awake engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from remix_megatron.algorithms import needs_critic
from remix_megatron.config import ConfigError, ExperimentConfig, ModelConfig
from remix_megatron.rollout import ENGINES
from remix_megatron.validation import layout_problems, resolve_world_size

GIB = 1 << 30
#: CUDA context, NCCL buffers and allocator fragmentation per GPU (an allowance, not a measurement).
GPU_RUNTIME_OVERHEAD_BYTES = 2 * GIB


# ------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """A TP x PP x DP grid in Megatron's default order tp-cp-ep-dp-pp (CP = EP = 1)."""

    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    virtual_pipeline: int
    num_layers: int

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    def rank(self, tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        return tp_rank + self.tensor_parallel * (dp_rank + self.data_parallel * pp_rank)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, pp_rank, dp_rank)`` of a global rank."""
        tp, dp = self.tensor_parallel, self.data_parallel
        return rank % tp, rank // (tp * dp), (rank // tp) % dp

    def groups(self, kind: str) -> list[list[int]]:
        """The rank lists of every ``tp`` | ``pp`` | ``dp`` group, as Megatron builds them."""
        sizes = {"tp": self.tensor_parallel, "pp": self.pipeline_parallel, "dp": self.data_parallel}
        if kind not in sizes:
            raise ValueError(f"group kind {kind!r} is not one of {', '.join(sizes)}")
        groups = []
        for leader in range(self.world_size):
            coords = dict(zip(("tp", "pp", "dp"), self.coordinates(leader)))
            if coords[kind] != 0:
                continue
            members = []
            for index in range(sizes[kind]):
                coords[kind] = index
                members.append(self.rank(coords["tp"], coords["pp"], coords["dp"]))
            groups.append(members)
        return groups

    def stage_layers(self, pp_rank: int) -> list[list[int]]:
        """0-based global layer numbers held by each virtual chunk of pipeline stage ``pp_rank``."""
        pp, vpp = self.pipeline_parallel, self.virtual_pipeline
        per_chunk = self.num_layers // (pp * vpp)
        return [list(range((chunk * pp + pp_rank) * per_chunk, (chunk * pp + pp_rank + 1) * per_chunk))
                for chunk in range(vpp)]


def plan_layout(cfg: ExperimentConfig, world_size: int) -> Layout:
    """Validate ``cfg``'s layout for ``world_size`` ranks as the trainer would, and return its grid."""
    data_parallel, problems = layout_problems(cfg, world_size)
    if problems:
        raise ConfigError("invalid layout:\n  " + "\n  ".join(problems))
    par = cfg.parallel
    return Layout(tensor_parallel=par.tensor_parallel, pipeline_parallel=par.pipeline_parallel,
                  data_parallel=data_parallel, virtual_pipeline=par.virtual_pipeline,
                  num_layers=cfg.model.num_layers)


# ------------------------------------------------------------------------------ parameters


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (RMSNorms replicated, linears split)."""
    h, d, ffn = model.hidden_size, model.head_dim, model.ffn_hidden_size
    qkv_out = (model.num_attention_heads + 2 * model.num_query_groups) * d
    norms = 2 * h  # input and pre-MLP RMSNorm weights
    qkv_bias = qkv_out // tp if model.add_qkv_bias else 0
    attention = qkv_out * h // tp + qkv_bias + h * model.num_attention_heads * d // tp  # QKV and output projection
    mlp = 2 * ffn * h // tp + ffn * h // tp  # fused gate/up (fc1) and down (fc2), no biases
    return norms + attention + mlp


def stage_parameters(model: ModelConfig, layout: Layout, pp_rank: int, *, critic: bool) -> int:
    """Parameters on one rank of pipeline stage ``pp_rank`` (actor, or critic with its value head)."""
    h, tp = model.hidden_size, layout.tensor_parallel
    layers = sum(len(chunk) for chunk in layout.stage_layers(pp_rank))
    count = layers * layer_parameters(model, tp)
    vocab_shard = model.vocab_size // tp * h
    if pp_rank == 0:
        count += vocab_shard  # word embeddings (no learned positions: RoPE)
    if pp_rank == layout.pipeline_parallel - 1:
        count += h  # final RMSNorm
        if critic:
            count += h + 1  # value head, replicated on TP ranks
        elif not model.tie_word_embeddings or layout.pipeline_parallel > 1:
            count += vocab_shard  # output layer (a copy of the embedding when tied across stages)
    return count


def total_parameters(model: ModelConfig, *, critic: bool = False) -> int:
    """Parameters of the whole model (one TP=1, PP=1 replica)."""
    return stage_parameters(model, Layout(1, 1, 1, 1, model.num_layers), 0, critic=critic)


def optimizer_bytes_per_parameter(*, bf16_params: bool) -> int:
    """Adam state per parameter: fp32 exp_avg and exp_avg_sq, plus an fp32 master copy for bf16."""
    return 8 + (4 if bf16_params else 0)


# ------------------------------------------------------------------------------ activations and engine


def layer_activation_bytes(model: ModelConfig, *, seq_length: int, micro_batch_size: float, tp: int,
                           sequence_parallel: bool, stores_attention_scores: bool, dtype_bytes: int) -> float:
    """Korthikanti et al.'s activation bytes of one layer for one micro-batch (see the module doc)."""
    s, b, h, a = seq_length, micro_batch_size, model.hidden_size, model.num_attention_heads
    per_layer = 34 * s * b * h / tp if sequence_parallel else s * b * h * (10 + 24 / tp)
    if stores_attention_scores:
        per_layer += 5 * a * s * s * b / tp
    return per_layer * dtype_bytes / 2  # the formula counts 16-bit activations


def chunks_in_flight(pp_rank: int, layout: Layout, num_microbatches: int) -> int:
    """Model-chunk micro-batches whose activations stage ``pp_rank`` holds at once under 1F1B."""
    pp, vpp = layout.pipeline_parallel, layout.virtual_pipeline
    if vpp == 1:
        return min(pp - pp_rank, num_microbatches)
    warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp  # Megatron's interleaved warm-up count
    return min(warmup + 1, num_microbatches * vpp)


def kv_bytes_per_token(model: ModelConfig, *, tp: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token on one engine rank (KV heads split over TP, at least one)."""
    kv_heads = max(model.num_query_groups // tp, 1)
    return 2 * model.num_layers * kv_heads * model.head_dim * dtype_bytes


@dataclass(frozen=True)
class EnginePlan:
    """One rank's share of the generation engine while it is awake."""

    engine: str
    weight_bytes: int
    kv_bytes_per_token: int
    tokens_per_sequence: int
    sequences: int  # generated by this engine replica per step
    kv_bytes_all: int  # KV cache for all of them at once
    reserved_bytes: int  # what the awake engine takes on this GPU
    concurrent_sequences: int  # how many fit at once (the rest wait: the engine batches in waves)


def plan_engine(cfg: ExperimentConfig, layout: Layout, *, gpu: bool, capacity_bytes: int) -> EnginePlan:
    model, rollout = cfg.model, cfg.rollout
    sharded = ENGINES.get(rollout.engine).tp_sharded  # one replica per TP group; HF: a replica per rank
    tp = layout.tensor_parallel if sharded else 1
    dtype_bytes = 2 if (gpu or sharded) else 4
    weights = total_parameters(model) * dtype_bytes // tp
    per_token = kv_bytes_per_token(model, tp=tp, dtype_bytes=dtype_bytes)
    tokens = rollout.max_prompt_tokens + rollout.max_new_tokens
    sequences = math.ceil(rollout.prompts_per_step * rollout.responses_per_prompt / layout.data_parallel)
    kv_all = sequences * tokens * per_token
    if sharded and capacity_bytes:
        reserved = int(rollout.gpu_memory_utilization * capacity_bytes)
        concurrent = min(sequences, max(reserved - weights, 0) // (tokens * per_token))
    else:
        reserved, concurrent = weights + kv_all, sequences
    return EnginePlan(engine=rollout.engine, weight_bytes=weights, kv_bytes_per_token=per_token,
                      tokens_per_sequence=tokens, sequences=sequences, kv_bytes_all=kv_all,
                      reserved_bytes=reserved, concurrent_sequences=concurrent)


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class StagePlan:
    """Bytes on one GPU of pipeline stage ``pp_rank``, by component."""

    pp_rank: int
    layers: list[list[int]]
    actor_parameters: int
    critic_parameters: int  # 0 without a critic (GRPO)
    rows: dict[str, int]  # component -> bytes
    resident_bytes: int  # models that stay on the GPU throughout
    activation_bytes: int  # training pass (engine asleep)
    engine_bytes: int  # generation (engine awake)
    peak_bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    layout: Layout
    gpu: bool
    params_dtype: str
    capacity_bytes: int  # 0 = not stated, not checked
    engine: EnginePlan
    stages: list[StagePlan]
    num_microbatches: int
    budgeted: bool = False  # micro-batches by token budget: the count is that of full-width rows (short rows make more)

    @property
    def peak_bytes(self) -> int:
        return max(stage.peak_bytes for stage in self.stages)

    @property
    def fits(self) -> bool:
        return (not self.capacity_bytes or self.peak_bytes <= self.capacity_bytes) and (
            self.engine.concurrent_sequences > 0)


def micro_batch_rows(cfg: ExperimentConfig) -> float:
    """Rows of the largest micro-batch at full width (``seq_length``): ``micro_batch_size``, or with a
    token budget the budget over ``seq_length`` (not a whole number in general): every token term
    of the activations is then ``seq_length x rows`` = the budget, and the attention scores',
    quadratic in the width, are largest for full-width rows."""
    trainer = cfg.trainer
    if trainer.max_tokens_per_micro_batch:
        return trainer.max_tokens_per_micro_batch / trainer.seq_length
    return trainer.micro_batch_size


def _uses_gpu(cfg: ExperimentConfig) -> bool:
    return cfg.cluster.gpus_per_node > 0 or cfg.parallel.backend == "nccl"


def plan_memory(cfg: ExperimentConfig, world_size: int | None = None, *,
                gpu_memory_gib: float | None = None) -> MemoryPlan:
    """The per-GPU memory plan of ``cfg`` on ``world_size`` ranks (default: its cluster section)."""
    layout = plan_layout(cfg, resolve_world_size(cfg, world_size))
    gpu = _uses_gpu(cfg)
    precision = cfg.parallel.precision if cfg.parallel.precision != "auto" else ("bf16" if gpu else "fp32")
    precision = precision if gpu else "fp32"  # bf16 on CPU autocasts over fp32 weights and optimizer
    dtype_bytes = 2 if precision == "bf16" else 4
    impl = cfg.parallel.transformer_impl if cfg.parallel.transformer_impl != "auto" else (
        "transformer_engine" if gpu else "local")
    memory_gib = cfg.cluster.gpu_memory_gib if gpu_memory_gib is None else gpu_memory_gib
    capacity = int(memory_gib * GIB)
    engine = plan_engine(cfg, layout, gpu=gpu, capacity_bytes=capacity)
    trainer, model = cfg.trainer, cfg.model
    batch_rows = micro_batch_rows(cfg)
    microbatches = math.ceil(engine.sequences / batch_rows)
    per_layer = layer_activation_bytes(model, seq_length=trainer.seq_length, micro_batch_size=batch_rows,
                                       tp=layout.tensor_parallel, sequence_parallel=cfg.parallel.sequence_parallel,
                                       stores_attention_scores=impl == "local", dtype_bytes=dtype_bytes)
    has_critic = needs_critic(cfg.algorithm.advantage_estimator)
    optimizer_share = layout.data_parallel if cfg.parallel.use_distributed_optimizer else 1
    adam = optimizer_bytes_per_parameter(bf16_params=precision == "bf16")
    stages = []
    for pp_rank in range(layout.pipeline_parallel):
        actor = stage_parameters(model, layout, pp_rank, critic=False)
        critic = stage_parameters(model, layout, pp_rank, critic=True) if has_critic else 0
        rows = {"actor weights": actor * dtype_bytes, "actor grads (fp32)": actor * 4,
                "actor Adam states": math.ceil(actor * adam / optimizer_share)}
        if has_critic:
            rows.update({"critic weights": critic * dtype_bytes, "critic grads (fp32)": critic * 4,
                         "critic Adam states": math.ceil(critic * adam / optimizer_share)})
        rows["reference + precedent weights"] = 2 * actor * dtype_bytes
        rows["runtime allowance"] = GPU_RUNTIME_OVERHEAD_BYTES if gpu else 0
        resident = sum(rows.values())
        layers_per_chunk = model.num_layers // (layout.pipeline_parallel * layout.virtual_pipeline)
        activations = per_layer * layers_per_chunk * chunks_in_flight(pp_rank, layout, microbatches)
        if pp_rank == layout.pipeline_parallel - 1:
            activations += (trainer.seq_length * batch_rows * model.vocab_size // layout.tensor_parallel
                            * (dtype_bytes + 8))
        rows["training activations (engine asleep)"] = int(activations)
        rows["engine awake: weights + KV"] = engine.reserved_bytes
        stages.append(StagePlan(pp_rank=pp_rank, layers=layout.stage_layers(pp_rank), actor_parameters=actor,
                                critic_parameters=critic, rows=rows, resident_bytes=resident,
                                activation_bytes=int(activations), engine_bytes=engine.reserved_bytes,
                                peak_bytes=resident + max(int(activations), engine.reserved_bytes)))
    return MemoryPlan(layout=layout, gpu=gpu, params_dtype=precision, capacity_bytes=capacity, engine=engine,
                      stages=stages, num_microbatches=microbatches,
                      budgeted=bool(trainer.max_tokens_per_micro_batch))


# ------------------------------------------------------------------------------ report


def _gib(size: float) -> str:
    return f"{size / GIB:.2f}"


def _unit(size: float) -> tuple[str, int]:
    return ("GiB", GIB) if size >= GIB else ("MiB", 1 << 20)


def _ranks(groups: list[list[int]], limit: int = 16) -> str:
    shown = " ".join(str(group).replace(" ", "") for group in groups[:limit])
    return shown + (f" ... ({len(groups)} groups)" if len(groups) > limit else "")


def format_layout(layout: Layout, *, max_ranks: int = 64) -> str:
    lines = [f"world size {layout.world_size} = TP{layout.tensor_parallel} x PP{layout.pipeline_parallel} x "
             f"DP{layout.data_parallel}" + (f" (VPP {layout.virtual_pipeline})" if layout.virtual_pipeline > 1 else "")
             + "; rank order tp-cp-ep-dp-pp"]
    for kind in ("tp", "pp", "dp"):
        lines.append(f"  {kind} groups: {_ranks(layout.groups(kind))}")
    for pp_rank in range(layout.pipeline_parallel):
        chunks = layout.stage_layers(pp_rank)
        described = ", ".join(f"chunk {v}: layers {c[0]}-{c[-1]}" for v, c in enumerate(chunks))
        lines.append(f"  stage {pp_rank}: {described}")
    ranks = [f"{r}:({','.join(map(str, layout.coordinates(r)))})" for r in range(min(layout.world_size, max_ranks))]
    lines.append("  rank:(tp,pp,dp) " + " ".join(ranks) + (" ..." if layout.world_size > max_ranks else ""))
    return "\n".join(lines)


def format_memory(plan: MemoryPlan) -> str:
    """The memory table (GiB per GPU, one column per pipeline stage) and the verdict."""
    stages, engine = plan.stages, plan.engine
    width = max(len(name) for name in stages[0].rows) + 2
    unit, scale = _unit(plan.peak_bytes)
    head = f"{unit + ' per GPU':<{width}}" + "".join(f"{'stage ' + str(s.pp_rank):>10}" for s in stages)
    lines = [f"memory ({'GPU' if plan.gpu else 'CPU'}, {plan.params_dtype} parameters, "
             f"{plan.num_microbatches} micro-batches per step per DP rank{' at full width' if plan.budgeted else ''})",
             head]
    for name in stages[0].rows:
        lines.append(f"{name:<{width}}" + "".join(f"{s.rows[name] / scale:>10.2f}" for s in stages))
    lines.append(f"{'peak':<{width}}" + "".join(f"{s.peak_bytes / scale:>10.2f}" for s in stages))
    lines.append(f"parameters per GPU: actor {stages[0].actor_parameters:,}"
                 + (f", critic {stages[0].critic_parameters:,}" if stages[0].critic_parameters else "")
                 + " (stage 0)")
    lines.append(f"engine ({engine.engine}): weights {_gib(engine.weight_bytes)} GiB, KV {engine.kv_bytes_per_token:,} "
                 f"B/token x {engine.tokens_per_sequence} tokens x {engine.sequences} sequences = "
                 f"{_gib(engine.kv_bytes_all)} GiB for all at once; {engine.concurrent_sequences} fit at once")
    if engine.concurrent_sequences == 0:
        lines.append("DOES NOT FIT: the engine's memory cannot hold its weights and one full-length sequence "
                     "(raise rollout.gpu_memory_utilization or parallel.tensor_parallel)")
    if not plan.capacity_bytes:
        lines.append(f"peak {_gib(plan.peak_bytes)} GiB per GPU; no GPU memory stated (cluster.gpu_memory_gib or "
                     "--gpu-memory-gib): not checked")
    elif plan.peak_bytes <= plan.capacity_bytes:
        lines.append(f"fits: peak {_gib(plan.peak_bytes)} GiB of {_gib(plan.capacity_bytes)} GiB per GPU")
    else:
        lines.append(f"DOES NOT FIT: peak {_gib(plan.peak_bytes)} GiB > {_gib(plan.capacity_bytes)} GiB per GPU "
                     "(more TP/PP, parallel.use_distributed_optimizer, a smaller micro-batch or sequence, "
                     "or a lower rollout.gpu_memory_utilization)")
    return "\n".join(lines)
