"""The experiment configuration: one frozen, keyword-only dataclass per section.

Every field carries a one-line doc (``metadata["doc"]``) that also lands in the generated
reference YAML (configs/reference.yaml). Checks that need only one section run in that
section's ``__post_init__`` (on every load); checks across sections, registries, the world size
or the file system run in ``remix_megatron.validation.validate``, the one path every command takes.
A field naming a registry entry (``model.family``, ``algorithm.kl_estimator``, ``rollout.engine`` ...)
is checked against that registry, its one source of names: here when the registry lives in the
config layer (model families, presets), else in ``validate`` (``validation.REGISTERED``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from remix_megatron.families import MODEL_FAMILIES
from remix_megatron.registry import Registry


class ConfigError(ValueError):
    """A configuration a user must fix; the message says what and how."""


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a one-line doc and an optional default."""
    return field(default=default, metadata={"doc": text}, **kwargs)


def section(text: str, factory: Any) -> Any:
    """A nested section field, built from its own defaults."""
    return field(default_factory=factory, metadata={"doc": text})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def _require_registered(name: str, value: str, registry: Registry) -> None:
    _require(value in registry, f"{name}: {registry.unknown_message(value)}")


def _require_positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        _require(value > 0, f"{type(owner).__name__}.{name}={value} must be > 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Transformer architecture. ``preset`` fills every field the YAML does not set."""

    preset: str = doc("model preset whose values fill unset fields (see `remix-megatron presets`); '' for none", "")
    hf_path: str = doc("HuggingFace checkpoint directory: its config.json fills unset fields (after the preset) "
                       "and its weights initialise the actor and the critic trunk; '' for none", "")
    family: str = doc("registered model family (remix_megatron/families.py): qwen2 | llama")
    num_layers: int = doc("transformer layers")
    hidden_size: int = doc("model width")
    ffn_hidden_size: int = doc("SwiGLU intermediate width")
    num_attention_heads: int = doc("query heads")
    num_query_groups: int = doc("key/value heads (GQA groups); equal to heads for plain MHA")
    vocab_size: int = doc("rows of the embedding and output layer (must be divisible by tensor_parallel)")
    max_position_embeddings: int = doc("longest sequence the rotary embedding is built for")
    rotary_base: float = doc("RoPE theta")
    norm_epsilon: float = doc("RMSNorm epsilon")
    add_qkv_bias: bool = doc("bias on the fused QKV projection (Qwen2: true, Llama: false)")
    tie_word_embeddings: bool = doc("share the input embedding with the output layer")

    def __post_init__(self) -> None:
        _require_registered("model.family", self.family, MODEL_FAMILIES)
        _require_positive(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                          "num_query_groups", "vocab_size", "max_position_embeddings", "rotary_base",
                          "norm_epsilon")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.hidden_size={self.hidden_size} is not divisible by "
                 f"model.num_attention_heads={self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                 f"model.num_query_groups={self.num_query_groups}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


BACKENDS = ("auto", "gloo", "nccl")
PRECISIONS = ("auto", "fp32", "bf16")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How models are split over ranks; data parallelism is what the world size leaves."""

    tensor_parallel: int = doc("tensor-parallel size (TP)", 1)
    pipeline_parallel: int = doc("pipeline-parallel size (PP)", 1)
    virtual_pipeline: int = doc("model chunks per pipeline rank (interleaved schedule); 1 = off", 1)
    sequence_parallel: bool = doc("shard activations along the sequence in TP regions (GPU only; needs TP > 1)", False)
    use_distributed_optimizer: bool = doc("shard optimizer state over data-parallel ranks", False)
    backend: str = doc("torch.distributed backend: auto (nccl with CUDA, else gloo) | gloo | nccl", "auto")
    precision: str = doc("auto (bf16 with CUDA, else fp32) | fp32 | bf16: bf16 parameters with Megatron's "
                         "mixed-precision optimizer on GPU; on CPU fp32 weights and optimizer, model passes under "
                         "bf16 autocast (log-softmax, ratios and losses in fp32)", "auto")
    transformer_impl: str = doc("layer spec: auto (TransformerEngine with CUDA, else local) | local | "
                                "transformer_engine", "auto")
    collective_timeout_s: int = doc("seconds a collective (start-up included) waits for every rank before the run "
                                    "aborts; ranks wait at the next one while another generates long rollouts, "
                                    "evaluates or saves a checkpoint", 3600)

    def __post_init__(self) -> None:
        _require_positive(self, "tensor_parallel", "pipeline_parallel", "virtual_pipeline", "collective_timeout_s")
        _require_choice("parallel.backend", self.backend, BACKENDS)
        _require_choice("parallel.precision", self.precision, PRECISIONS)
        _require_choice("parallel.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        _require(self.virtual_pipeline == 1 or self.pipeline_parallel > 1,
                 f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline_parallel > 1")
        _require(not self.sequence_parallel or self.tensor_parallel > 1,
                 "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Adam(W) through Megatron's optimizer (constant learning rate by default, as in the paper)."""

    lr: float = doc("learning rate")
    weight_decay: float = doc("decoupled weight decay", 0.0)
    adam_beta1: float = doc("Adam beta1", 0.9)
    adam_beta2: float = doc("Adam beta2", 0.999)
    adam_eps: float = doc("Adam epsilon", 1e-8)
    clip_grad: float = doc("global gradient-norm clip; 0 disables", 1.0)
    lr_decay: str = doc("constant (the paper) | linear: lr at the first iteration down to lr * min_lr_ratio at "
                        "trainer.num_steps (a resumed run continues it exactly; changing num_steps reshapes it)",
                        "constant")
    min_lr_ratio: float = doc("lr_decay=linear: final learning rate as a fraction of lr", 0.0)

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optimizer lr={self.lr} must be > 0")
        _require_choice("optimizer lr_decay", self.lr_decay, ("constant", "linear"))
        _require(0 <= self.min_lr_ratio <= 1, f"optimizer min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        _require(self.weight_decay >= 0, f"optimizer weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
                 f"optimizer betas ({self.adam_beta1}, {self.adam_beta2}) must lie in [0, 1)")
        _require(self.adam_eps > 0, f"optimizer adam_eps={self.adam_eps} must be > 0")
        _require(self.clip_grad >= 0, f"optimizer clip_grad={self.clip_grad} must be >= 0 (0 disables)")


def _actor_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-6)


def _critic_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-5)


CONTROLS = ("none", "no_update", "shuffled_rewards")
CONSOLE_METRICS = ("reward_mean", "response_length", "actor/pg_loss", "actor/kl_ref", "actor/lr", "actor/ratio_mean",
                   "actor/clip_frac")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Batching and run-level settings."""

    seed: int = doc("seed for weights, data order and sampling", 1234)
    micro_batch_size: int = doc("sequences per micro-batch on one data-parallel rank", 1)
    global_batch_size: int = doc("sequences per optimizer step over all data-parallel ranks", 4)
    seq_length: int = doc("tokens per training sequence (prompt + response, padded)", 64)
    max_tokens_per_micro_batch: int = doc(
        "token budget of a micro-batch (rows x its longest row, padding counted): rows of each minibatch are "
        "grouped longest first under it, each micro-batch at its own width; 0 = off: micro_batch_size rows per "
        "micro-batch at the batch's width. micro_batch_size still sets how minibatches are cut", 0)
    balance_data_parallel: bool = doc(
        "with max_tokens_per_micro_batch and DP > 1: move rows between data-parallel ranks so each trains and "
        "computes about the same number of tokens (a rank with the long tail no longer holds the others up); the "
        "gradient is unchanged (per-token losses are normalised over every DP rank)", True)
    packed_sequences: bool = doc(
        "token-budget micro-batches packed end to end without padding (THD layout, Megatron's PackedSeqParams): "
        "GPU with the TransformerEngine spec only; needs max_tokens_per_micro_batch", False)
    num_steps: int = doc("training iterations to run (in total, counting resumed ones)", 3)
    run_dir: str = doc("directory for the resolved config, metrics and checkpoints", "runs/default")
    checkpoint_dir: str = doc("checkpoint root; '' = <run_dir>/checkpoints", "")
    save_interval: int = doc("save a checkpoint every this many iterations and after the last; "
                             "0 = after the last only; -1 = never", 0)
    keep_checkpoints: int = doc("complete checkpoints to keep (older ones are deleted)", 2)
    resume: bool = doc("continue from the newest complete checkpoint in checkpoint_dir when there is one (the "
                       "default); false refuses a run_dir that already holds a run", True)
    overwrite: bool = doc("remove the earlier run's store, checkpoints, metrics, plots and export in run_dir, then "
                          "start afresh", False)
    loggers: list[str] = doc("registered metric backends besides metrics.jsonl (always written) and the PNG plots: "
                             "wandb | tensorboard (<run_dir>/tensorboard)", default_factory=lambda: ["jsonl"])
    wandb_project: str = doc("wandb project (loggers has wandb); online when wandb finds credentials (WANDB_API_KEY, "
                             "`wandb login`) or WANDB_MODE says so, else offline", "remix-megatron")
    wandb_entity: str = doc("wandb entity (team or user); '' = wandb's default", "")
    wandb_name: str = doc("wandb run name; '' = the run directory's name", "")
    wandb_group: str = doc("wandb group (a sweep puts its points in one group named after the sweep); '' = none", "")
    wandb_tags: list[str] = doc("wandb tags", default_factory=list)
    console_metrics: list[str] = doc("metrics in each iteration's console line (any metrics.jsonl key; a missing one "
                                     "is left out)", default_factory=lambda: list(CONSOLE_METRICS))
    max_skipped_steps: int = doc("stop after this many optimizer steps in a row skipped for NaN/inf gradients", 3)
    reuse_training_forward: bool = doc("a single on-policy pass (p = 0 for good, UTD 1, one minibatch, no critic): "
                                       "take the behaviour log-probs from the training forward itself (ratio "
                                       "exactly 1) instead of a separate actor pass at collection", True)
    log_unused_kl: bool = doc("run the reference / precedent forward passes even when their KL weight in the loss is "
                              "0 (kl_coef 0, KL-convex off, lambda 1), to log actor/kl_ref, actor/kl_prev and "
                              "drift/*_prev_fresh; off: those passes are skipped and the metrics absent", False)
    control: str = doc("control experiment (benchmarks): none | no_update (losses computed, no optimizer step) | "
                       "shuffled_rewards (each step's fresh rewards permuted across its rollouts)", "none")

    def __post_init__(self) -> None:
        _require_positive(self, "micro_batch_size", "global_batch_size", "seq_length", "num_steps")
        _require(self.seed >= 0, f"trainer.seed={self.seed} must be >= 0 (numpy's generators take no negative seed)")
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 f"trainer.global_batch_size={self.global_batch_size} is not divisible by "
                 f"trainer.micro_batch_size={self.micro_batch_size}")
        _require(self.max_tokens_per_micro_batch == 0 or self.max_tokens_per_micro_batch >= self.seq_length,
                 f"trainer.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch} must be 0 (off) or at least "
                 f"trainer.seq_length={self.seq_length} (a row of the longest width must fit)")
        _require(not self.packed_sequences or self.max_tokens_per_micro_batch > 0,
                 "trainer.packed_sequences=true packs token-budget micro-batches: set "
                 "trainer.max_tokens_per_micro_batch")
        _require(bool(self.run_dir), "trainer.run_dir must not be empty")
        _require(self.save_interval >= -1, f"trainer.save_interval={self.save_interval} must be >= -1 (-1 = never)")
        _require(self.keep_checkpoints >= 1, f"trainer.keep_checkpoints={self.keep_checkpoints} must be >= 1")
        _require(self.max_skipped_steps >= 1, f"trainer.max_skipped_steps={self.max_skipped_steps} must be >= 1")
        _require_choice("trainer.control", self.control, CONTROLS)

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoint_dir or f"{self.run_dir}/checkpoints"


GRPO_REPLAY_ADVANTAGES = ("stored", "recompute")


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """ReMix and its on-policy special cases (PPO, GRPO): losses, advantages, schedules.

    Defaults are the paper's ReMix-PPO (../shared/REMIX.md). Steps t count from 1.
    """

    policy_loss: str = doc("registered policy loss: mix_ppg (generalised clip) | ppo", "mix_ppg")
    advantage_estimator: str = doc("registered advantage estimator: vtrace_gae | gae | grpo", "vtrace_gae")
    clip_eps_low: float = doc("clip half-width below the centre", 0.2)
    clip_eps_high: float = doc("clip half-width above the centre (> low = clip-higher)", 0.2)
    dual_clip_c: float = doc("dual-clip bound c > 1 on negative-advantage tokens; 0 = off", 0.0)
    loss_agg: str = doc("registered loss aggregation: token_mean | seq_mean_token_mean | seq_mean_token_sum | "
                        "token_sum_norm", "token_mean")
    loss_agg_norm_tokens: int = doc("token_sum_norm only: constant tokens per sequence to divide by", 0)
    entropy_coef: float = doc("entropy bonus c in loss = L_pg - c*H + beta*L_kl", 0.001)
    kl_coef: float = doc("beta, the weight of the KL(-convex) term; 0 = no KL term", 0.001)
    kl_estimator: str = doc("registered per-token KL estimator: k1 | k2 | k3 (low-variance, clamped)", "k3")
    kl_convex: bool = doc("KL-convex: mix KL to the reference and to the precedent policy by lambda(t); "
                          "false = KL to the reference only", True)
    kl_lambda_start: int = doc("lambda(t) = 1 up to this step", 50)
    kl_lambda_interval: int = doc("steps between lambda decrements", 10)
    kl_lambda_decay: float = doc("lambda decrement per interval", 0.1)
    kl_lambda_floor: float = doc("lowest lambda", 0.5)
    gamma: float = doc("discount", 1.0)
    lam: float = doc("GAE lambda", 1.0)
    vtrace_c_bar: float = doc("V-trace truncation of pi_k/behaviour in GAE traces", 1.0)
    whiten_advantages: bool = doc("normalise advantages over the batch's valid tokens (GAE estimators)", True)
    grpo_norm_std: bool = doc("GRPO: divide by the group's reward std (false = Dr.GRPO mean-only)", True)
    grpo_eps: float = doc("GRPO: added to the group std", 1e-6)
    grpo_replay_advantage: str = doc("GRPO replayed samples: stored (advantage of their own group when "
                                     "generated) | recompute (again from the stored group rewards)", "stored")
    value_clip: float = doc("critic value clip range around the critic's values as the iteration starts (for "
                            "fresh rows: the values at collection)", 0.5)
    off_policy_portion: float = doc("p: share of each batch replayed from earlier policies", 0.4)
    replay_window: int = doc("N: replay from iterations k-N .. k-1", 2)
    utd: int = doc("update-to-data ratio: passes over each mixed batch", 2)
    fresh_multiple_of: int = doc("fresh prompts per step are rounded down to a multiple of this "
                                 "(the paper's 152 of 256 at p=0.4 is floor(153.6/8)*8)", 8)
    reincarnation_step: int = doc("T: after step T the reference becomes the policy and training turns "
                                  "on-policy; 0 = never", 50)
    post_reincarnation_utd: int = doc("UTD after reincarnation", 1)
    drift_control: bool = doc("GePPO-style adaptive actor lr: each iteration, the per-token TV between pi_k and "
                              "pi_{k-1} on fresh tokens (drift/tv_prev_fresh, the last update's move) above "
                              "drift_tv_high divides the lr scale by drift_lr_factor, below drift_tv_low multiplies "
                              "it; the scale stays in [drift_lr_min_scale, 1] and is checkpointed", False)
    drift_tv_low: float = doc("drift_control: bottom of the per-token TV band (GePPO's MuJoCo eps/4 is far too loose "
                              "for token policies; the tiny PPO baseline moves ~0.007-0.011 per iteration)", 0.005)
    drift_tv_high: float = doc("drift_control: top of the per-token TV band", 0.01)
    drift_lr_factor: float = doc("drift_control: lr scale divided or multiplied by this outside the band", 1.5)
    drift_lr_min_scale: float = doc("drift_control: smallest lr scale", 0.05)
    mismatch_correction: str = doc("engine/trainer mismatch: weight each token's policy loss by w = trainer "
                                   "behaviour / engine sampling probability, tis (truncated at mismatch_cap) | mis "
                                   "(masked outside [1/cap, cap]) | none", "none")
    mismatch_level: str = doc("mismatch correction per token | per sequence (the response's product of w)", "token")
    mismatch_cap: float = doc("mismatch correction: cap on w (tis) or bound of the kept band (mis), > 1", 2.0)

    def __post_init__(self) -> None:
        _require(self.clip_eps_low > 0 and self.clip_eps_high > 0,
                 f"algorithm clip_eps_low={self.clip_eps_low}, clip_eps_high={self.clip_eps_high} must be > 0")
        _require(self.dual_clip_c == 0 or self.dual_clip_c > 1,
                 f"algorithm.dual_clip_c={self.dual_clip_c} must be 0 (off) or > 1")
        _require(self.loss_agg != "token_sum_norm" or self.loss_agg_norm_tokens > 0,
                 "algorithm.loss_agg=token_sum_norm needs algorithm.loss_agg_norm_tokens > 0 "
                 "(e.g. the maximum response length)")
        _require_choice("algorithm.grpo_replay_advantage", self.grpo_replay_advantage, GRPO_REPLAY_ADVANTAGES)
        if self.mismatch_cap <= 1:
            raise ConfigError(f"algorithm.mismatch_cap={self.mismatch_cap} must be > 1")
        for name in ("entropy_coef", "kl_coef", "kl_lambda_start", "kl_lambda_decay", "value_clip",
                     "replay_window", "reincarnation_step"):
            _require(getattr(self, name) >= 0, f"algorithm.{name}={getattr(self, name)} must be >= 0")
        _require_positive(self, "kl_lambda_interval", "utd", "post_reincarnation_utd", "fresh_multiple_of",
                          "vtrace_c_bar", "grpo_eps")
        _require(0 <= self.kl_lambda_floor <= 1, f"algorithm.kl_lambda_floor={self.kl_lambda_floor} must lie in [0, 1]")
        _require(0 < self.gamma <= 1 and 0 <= self.lam <= 1,
                 f"algorithm gamma={self.gamma} must lie in (0, 1] and lam={self.lam} in [0, 1]")
        _require(0 <= self.drift_tv_low < self.drift_tv_high,
                 f"algorithm.drift_tv_low={self.drift_tv_low} must be >= 0 and below "
                 f"drift_tv_high={self.drift_tv_high}")
        _require(self.drift_lr_factor > 1, f"algorithm.drift_lr_factor={self.drift_lr_factor} must be > 1")
        _require(0 < self.drift_lr_min_scale <= 1,
                 f"algorithm.drift_lr_min_scale={self.drift_lr_min_scale} must lie in (0, 1]")
        _require(0 <= self.off_policy_portion < 1,
                 f"algorithm.off_policy_portion={self.off_policy_portion} must lie in [0, 1)")
        _require(self.off_policy_portion == 0 or self.replay_window > 0,
                 f"algorithm.off_policy_portion={self.off_policy_portion} needs algorithm.replay_window >= 1")


REPLAY_SHORTAGE = ("take_all", "fill_fresh")


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """The on-disk trajectory store and the mixed sampler that replays from it."""

    path: str = doc("store directory; '' = <trainer.run_dir>/store", "")
    row_group_size: int = doc("records per record batch of a shard (the sampler reads whole batches)", 16)
    compression: str = doc("registered shard compression: zstd | lz4 | none (lz4 writes faster and compresses less; "
                           "benchmarks/store_throughput.py measures all three)", "zstd")
    keep_iterations: int = doc("prune all but the newest this many iterations; 0 = keep everything", 0)
    replay_weighting: str = doc("registered replay weighting: uniform over the window's groups | age (weight "
                                "age_decay**(age-1))", "uniform")
    replay_age_decay: float = doc("per-iteration weight decay for replay_weighting=age", 0.5)
    shortage: str = doc("window holds too few groups: take_all (smaller batch, warn) | fill_fresh "
                        "(roll out more fresh prompts)", "take_all")

    def __post_init__(self) -> None:
        _require_positive(self, "row_group_size")
        _require(self.keep_iterations >= 0, f"store.keep_iterations={self.keep_iterations} must be >= 0")
        _require_choice("store.shortage", self.shortage, REPLAY_SHORTAGE)
        _require(0 < self.replay_age_decay <= 1, f"store.replay_age_decay={self.replay_age_decay} must lie in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """The hardware an experiment is written for: what `remix-megatron dryrun` and the Slurm
    sweeps read (the launchers take node and GPU counts from torchrun / Slurm themselves)."""

    nodes: int = doc("nodes the experiment runs on", 1)
    gpus_per_node: int = doc("GPUs (one rank each) per node; 0 = CPU processes, the world size then comes "
                             "from the launcher (dry run: --world-size, else TP*PP)", 0)
    gpu_memory_gib: float = doc("memory of one GPU in GiB that the dry run checks the plan against; "
                                "0 = not checked", 0.0)

    def __post_init__(self) -> None:
        _require_positive(self, "nodes")
        _require(self.gpus_per_node >= 0, f"cluster.gpus_per_node={self.gpus_per_node} must be >= 0 (0 = CPU)")
        _require(self.gpu_memory_gib >= 0, f"cluster.gpu_memory_gib={self.gpu_memory_gib} must be >= 0 (0 = unchecked)")

    @property
    def world_size(self) -> int:
        """Ranks on the stated hardware; 0 when it is CPU processes (not stated)."""
        return self.nodes * self.gpus_per_node


ENGINE_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Generation: the colocated engine and how it samples (paper defaults where they apply)."""

    engine: str = doc("registered generation engine: hf (transformers; CPU and GPU) | vllm | sglang (GPU)", "hf")
    prompts_per_step: int = doc("B: prompts per iteration (fresh + replayed)", 256)
    responses_per_prompt: int = doc("n: responses sampled per prompt (PPO 1, GRPO 8)", 1)
    max_prompt_tokens: int = doc("longer prompts are dropped (counted and reported)", 766)
    max_new_tokens: int = doc("longest response", 8192)
    temperature: float = doc("sampling temperature", 1.0)
    top_p: float = doc("nucleus sampling", 1.0)
    top_k: int = doc("top-k sampling; -1 = off", -1)
    gpu_memory_utilization: float = doc("vllm/sglang: share of GPU memory the awake engine may take", 0.5)
    engine_dtype: str = doc("vllm/sglang: the engine's weight and activation dtype: bfloat16 | float32 (exact "
                            "agreement with an fp32 actor, as in the CPU tests)", "bfloat16")
    cpu_kv_cache_gb: float = doc("vllm on CPU: GiB of host RAM per rank for the KV cache (VLLM_CPU_KVCACHE_SPACE, "
                                 "when set, wins); 0 = gpu_memory_utilization's share of all host RAM", 1.0)
    hf_batch_size: int = doc("hf engine: prompts per model.generate call (larger is faster, needs more memory; "
                             "vllm/sglang schedule their own batches)", 256)
    weight_sync_bucket_mb: int = doc("weight sync: MB of HF-named tensors sent to the engine per bucket", 512)
    logprob_check_interval: int = doc("compare engine and actor log-probs every this many syncs; 0 = never", 1)
    logprob_check_threshold: float = doc("stop the run (LogprobMismatchError) when the mean |engine - actor| "
                                         "log-prob gap exceeds this: the engine's weights or numerics are off", 0.05)

    def __post_init__(self) -> None:
        _require_positive(self, "prompts_per_step", "responses_per_prompt", "max_prompt_tokens", "max_new_tokens",
                          "top_p", "weight_sync_bucket_mb", "logprob_check_threshold", "hf_batch_size")
        _require(self.temperature >= 0, f"rollout.temperature={self.temperature} must be >= 0")
        _require(self.top_p <= 1, f"rollout.top_p={self.top_p} must be <= 1")
        _require(self.top_k == -1 or self.top_k >= 1, f"rollout.top_k={self.top_k} must be -1 (off) or >= 1")
        _require_choice("rollout.engine_dtype", self.engine_dtype, ENGINE_DTYPES)
        _require(self.cpu_kv_cache_gb >= 0, f"rollout.cpu_kv_cache_gb={self.cpu_kv_cache_gb} must be >= 0")
        _require(0 < self.gpu_memory_utilization < 1,
                 f"rollout.gpu_memory_utilization={self.gpu_memory_utilization} must lie in (0, 1)")
        _require(self.logprob_check_interval >= 0,
                 f"rollout.logprob_check_interval={self.logprob_check_interval} must be >= 0")


PAPER_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."
OVERLONG_POLICIES = ("drop", "truncate")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Prompts, their template, the reward, and held-out evaluation."""

    train_path: str = doc("training prompts: .jsonl, .parquet, an HF datasets directory or hub name", "")
    eval_path: str = doc("held-out prompts for periodic greedy accuracy; '' = none", "")
    problem_key: str = doc("record field with the problem text", "problem")
    answer_key: str = doc("record field with the reference answer", "answer")
    id_key: str = doc("record field with a prompt id (row index when absent)", "id")
    template: str = doc("prompt template ({problem} is replaced), then the tokenizer's chat template", PAPER_TEMPLATE)
    overlong: str = doc("prompts over rollout.max_prompt_tokens: drop | truncate (counted either way)", "drop")
    reward: str = doc("registered reward (see remix_megatron.rewards): math", "math")
    eval_interval: int = doc("evaluate every this many iterations (and before the first, and after the last); "
                             "0 = never", 10)
    eval_every_rollouts: int = doc("evaluate at the first iteration whose rollouts generated reach each multiple of "
                                   "this (and before the first and after the last), instead of every "
                                   "data.eval_interval iterations: evaluations at matched rollout counts whatever "
                                   "the algorithm; 0 = by data.eval_interval", 0)
    eval_size: int = doc("held-out prompts evaluated; 0 = all", 0)
    eval_benchmarks: str = doc("benchmarks also scored at each evaluation, comma-separated: aime24, amc23, math500, "
                               "minerva, olympiadbench (from data.benchmark_dir) or name=PATH; '' = none", "")
    benchmark_dir: str = doc("directory holding <name>.jsonl for the named benchmarks", "../shared/data")
    eval_benchmark_size: int = doc("problems of each benchmark scored at each evaluation; 0 = all", 0)
    eval_samples: int = doc("responses per benchmark problem; 0 = the paper's protocol (avg@32 at temperature 0.1 "
                            "for AIME/AMC, greedy pass@1 for the others)", 0)
    eval_temperature: float = doc("sampling temperature when data.eval_samples > 1", 0.1)

    def __post_init__(self) -> None:
        _require_choice("data.overlong", self.overlong, OVERLONG_POLICIES)
        _require("{problem}" in self.template, f"data.template={self.template!r} must contain {{problem}}")
        _require(self.eval_every_rollouts >= 0, f"data.eval_every_rollouts={self.eval_every_rollouts} must be >= 0")
        _require(self.eval_interval >= 0 and self.eval_size >= 0,
                 f"data.eval_interval={self.eval_interval} and data.eval_size={self.eval_size} must be >= 0")
        _require(self.eval_benchmark_size >= 0 and self.eval_samples >= 0,
                 f"data.eval_benchmark_size={self.eval_benchmark_size} and data.eval_samples={self.eval_samples} "
                 "must be >= 0")
        _require(self.eval_samples <= 1 or self.eval_temperature > 0,
                 f"data.eval_samples={self.eval_samples} greedy samples would be identical: "
                 "set data.eval_temperature > 0")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One experiment: every section, loaded from one YAML file plus CLI overrides."""

    model: ModelConfig = doc("transformer architecture (actor and critic trunk)")
    parallel: ParallelConfig = section("parallel layout and hardware choices", ParallelConfig)
    actor_optimizer: OptimizerConfig = section("actor optimizer (paper: lr 1e-6)", _actor_optimizer)
    critic_optimizer: OptimizerConfig = section("critic optimizer (paper: lr 1e-5)", _critic_optimizer)
    algorithm: AlgorithmConfig = section("ReMix / PPO / GRPO losses, advantages and schedules", AlgorithmConfig)
    rollout: RolloutConfig = section("generation engine and sampling", RolloutConfig)
    data: DataConfig = section("prompts, template, reward, evaluation", DataConfig)
    store: StoreConfig = section("trajectory store and replay sampler", StoreConfig)
    trainer: TrainerConfig = section("batching and run settings", TrainerConfig)
    cluster: ClusterConfig = section("the hardware the experiment is written for (dry run, Slurm sweeps)",
                                     ClusterConfig)

    def __post_init__(self) -> None:
        keep, window = self.store.keep_iterations, self.algorithm.replay_window
        _require(keep == 0 or keep > window,
                 f"store.keep_iterations={keep} would prune iterations still in the replay window "
                 f"(algorithm.replay_window={window}); use 0 or at least {window + 1}")
