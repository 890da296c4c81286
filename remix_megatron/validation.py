"""One validation path: every check of an experiment that needs no model weights and no processes.

``train``, ``config check``, ``dryrun`` and ``sweep`` all call ``validate`` before anything heavy
starts, so a config one of them accepts is one the others accept. A section's own checks run
when its dataclass is built (``config/schema.py``, on every load); this module adds what needs
several sections, the world size, the registries (losses, estimators, rewards, engines) or the
file system. Every problem is collected and reported at once as one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from remix_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    fresh_prompts,
)
from remix_megatron.algorithms.mismatch import MISMATCH_CORRECTIONS, MISMATCH_LEVELS
from remix_megatron.config import ConfigError, ExperimentConfig, layout_errors
from remix_megatron.evaluation import config_benchmarks
from remix_megatron.metrics_log import check_loggers
from remix_megatron.registry import Registry
from remix_megatron.rewards import REWARDS
from remix_megatron.rollout import ENGINES, get_engine_factory
from remix_megatron.store.sampler import REPLAY_WEIGHTINGS
from remix_megatron.store.store import COMPRESSIONS

#: rollout sampling the losses assume: every log-prob is of the untempered, untruncated policy
UNTEMPERED = (1.0, 1.0, -1)
#: config keys whose value names a registry entry, checked against the registry (the names' one source).
#: model.family and model.preset are checked when the config is built (their registries are in the config layer).
REGISTERED: tuple[tuple[str, Registry], ...] = (
    ("algorithm.policy_loss", POLICY_LOSSES), ("algorithm.advantage_estimator", ADVANTAGE_ESTIMATORS),
    ("algorithm.loss_agg", LOSS_AGGREGATIONS), ("algorithm.kl_estimator", KL_ESTIMATORS),
    ("store.replay_weighting", REPLAY_WEIGHTINGS), ("store.compression", COMPRESSIONS), ("data.reward", REWARDS),
    ("rollout.engine", ENGINES), ("algorithm.mismatch_correction", MISMATCH_CORRECTIONS),
    ("algorithm.mismatch_level", MISMATCH_LEVELS),
)


@dataclass(frozen=True)
class Checked:
    """What validation found: the data-parallel size and warnings (problems that do not stop a run)."""

    world_size: int
    data_parallel: int
    warnings: list[str] = field(default_factory=list)


def resolve_world_size(cfg: ExperimentConfig, world_size: int | None = None) -> int:
    """The world size to check for: given, else the config's cluster, else the smallest (TP x PP)."""
    if world_size is not None and world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    return world_size or cfg.cluster.world_size or cfg.parallel.model_parallel_size


def layout_problems(cfg: ExperimentConfig, world_size: int) -> tuple[int, list[str]]:
    """The data-parallel size and what keeps ``cfg`` from splitting over ``world_size`` ranks."""
    par = cfg.parallel
    data_parallel, problems = max(world_size // par.model_parallel_size, 1), layout_errors(cfg, world_size)
    if world_size < par.model_parallel_size:
        problems.append(f"world size {world_size} is smaller than tensor_parallel*pipeline_parallel="
                        f"{par.model_parallel_size}")
    try:
        fresh = fresh_prompts(cfg.rollout.prompts_per_step, cfg.algorithm.off_policy_portion,
                              cfg.algorithm.fresh_multiple_of)
        if fresh < data_parallel:
            problems.append(f"{fresh} fresh prompts per step cannot give each of the {data_parallel} data-parallel "
                            "ranks one: raise rollout.prompts_per_step or lower algorithm.off_policy_portion")
    except ValueError as error:
        problems.append(f"rollout.prompts_per_step: {error}")
    if par.sequence_parallel and cfg.trainer.seq_length % par.tensor_parallel:
        problems.append(f"trainer.seq_length={cfg.trainer.seq_length} is not divisible by "
                        f"parallel.tensor_parallel={par.tensor_parallel} (sequence parallelism splits it)")
    return data_parallel, problems


def _non_finite(section: object, prefix: str) -> list[str]:
    """Float fields holding inf or nan (``x > 0`` accepts inf), anywhere in the tree."""
    problems = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            problems += _non_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{prefix}{f.name}={value} must be a finite number")
    return problems


def _registered(cfg: ExperimentConfig) -> list[str]:
    """Names the registries do not know (each answered with the known ones), and an engine that cannot load."""
    problems = []
    for key, registry in REGISTERED:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in registry:
            problems.append(f"{key}: {registry.unknown_message(value)}")
    if cfg.rollout.engine in ENGINES:
        try:
            get_engine_factory(cfg.rollout.engine)
        except ImportError as error:  # its module's imports are missing here
            problems.append(f"rollout.engine={cfg.rollout.engine} is not installed here ({error})")
    return problems


def _transformer_engine(cfg: ExperimentConfig) -> bool:
    """Whether a run on this machine gets the TransformerEngine layer spec."""
    import torch

    from remix_megatron.parallel import transformer_engine_installed

    usable = torch.cuda.is_available() and transformer_engine_installed()
    return usable and cfg.parallel.transformer_impl in ("auto", "transformer_engine")


def training_problems(cfg: ExperimentConfig) -> list[str]:
    """What a training run on this machine needs: its start checkpoint, prompts and evaluation sets, and
    TransformerEngine for packed sequences."""
    problems = []
    if not cfg.model.hf_path:
        problems.append("model.hf_path is required for training: the HF checkpoint to start from (weights and "
                        "tokenizer), e.g. model.hf_path=$(remix-megatron tiny --path-only)")
    elif not Path(cfg.model.hf_path).is_dir():
        problems.append(f"model.hf_path={cfg.model.hf_path} is not a directory")
    if cfg.trainer.packed_sequences and not _transformer_engine(cfg):
        problems.append("trainer.packed_sequences=true needs CUDA GPUs and the TransformerEngine layer spec (THD "
                        "attention; Megatron's local spec has none): on CPU use "
                        "trainer.max_tokens_per_micro_batch alone")
    train_path = cfg.data.train_path
    if not train_path:
        problems.append("data.train_path is required for training (a .jsonl / .parquet / HF datasets path)")
    elif Path(train_path).suffix in (".jsonl", ".parquet") and not Path(train_path).is_file():
        problems.append(f"data.train_path={train_path} does not exist")
    try:
        config_benchmarks(cfg.data)
    except ValueError as error:
        problems.append(f"evaluation sets: {error}")
    return problems


def _sampling(cfg: ExperimentConfig) -> list[str]:
    sampling = (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
    if sampling == UNTEMPERED:
        return []
    return [f"rollout.temperature={sampling[0]}, top_p={sampling[1]}, top_k={sampling[2]}: training rollouts must "
            "come from the policy the losses use. Every log-prob in them (behaviour, pi_k, reference, the importance "
            "ratios and V-trace traces) is of the untempered, untruncated distribution, as the engines' are (vLLM's "
            "raw log-probs): sample with temperature 1.0, top_p 1.0, top_k -1, the paper's setting."]


# CPU feature flags (/proc/cpuinfo) of native bf16 matrix multiplication: without one of them
# torch emulates bf16 matmuls, several times slower than fp32 (0.18x per actor step on an AVX2 EPYC)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (Linux's /proc/cpuinfo; empty where it cannot be read)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def native_cpu_bf16() -> list[str] | None:
    """The native bf16 flags this CPU has (empty: none, bf16 is emulated); None if unknown."""
    flags = cpu_flags()
    return sorted(flags.intersection(NATIVE_BF16_FLAGS)) if flags else None


def _warnings(cfg: ExperimentConfig) -> list[str]:
    import torch

    out = []
    step, steps = cfg.algorithm.reincarnation_step, cfg.trainer.num_steps
    if step > steps:
        out.append(f"algorithm.reincarnation_step={step} > trainer.num_steps={steps}: this run never reincarnates "
                   "(set algorithm.reincarnation_step=0 to say so, or raise trainer.num_steps)")
    if cfg.parallel.precision == "bf16" and not torch.cuda.is_available() and native_cpu_bf16() == []:
        out.append(f"parallel.precision=bf16 on a CPU without native bf16 ({' or '.join(NATIVE_BF16_FLAGS)} "
                   "in /proc/cpuinfo): torch emulates bf16 matmuls here, so training runs several times slower "
                   "than in fp32 (5.5x per actor step measured on an AVX2 CPU); parallel.precision=fp32 is faster")
    return out


def validate(cfg: ExperimentConfig, world_size: int | None = None, *, training: bool = True) -> Checked:
    """Every weight-free check of ``cfg`` on ``world_size`` ranks (None: the cluster section, else TP x PP).

    ``training=False`` leaves out the files only a training run reads (``training_problems``: a
    dry run plans configs whose checkpoint and data are given at launch, on another machine).
    Raises one ``ConfigError`` listing every problem.
    """
    size = resolve_world_size(cfg, world_size)
    data_parallel, problems = layout_problems(cfg, size)
    problems += _non_finite(cfg, "") + _registered(cfg) + _sampling(cfg) + check_loggers(cfg.trainer.loggers)
    if training:
        problems += training_problems(cfg)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} problems:\n  " + "\n  ".join(problems))
    return Checked(world_size=size, data_parallel=data_parallel, warnings=_warnings(cfg))
