"""The ``remix-megatron convert`` commands (run under torchrun for more than one process)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from remix_megatron.checkpoint import checkpoint_dir, load_checkpoint, read_trainer_state, save_checkpoint
from remix_megatron.config import ConfigError, ExperimentConfig, load_config
from remix_megatron.convert.export import export_hf, load_hf_into, verify_against_hf
from remix_megatron.models import build_actor, build_critic, make_trainable
from remix_megatron.parallel import destroy_parallel, init_parallel, world_size_from_env

#: to-hf runs at TP1/PP1 on one process unless the command line overrides the layout.
SINGLE_PROCESS = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.virtual_pipeline=1",
                  "parallel.use_distributed_optimizer=false"]


def _need_hf_path(cfg: ExperimentConfig) -> str:
    if not cfg.model.hf_path:
        raise ConfigError("set model.hf_path to the HuggingFace checkpoint directory")
    return cfg.model.hf_path


def _need_ranks(cfg: ExperimentConfig, action: str) -> None:
    """A layout of more ranks than this run has: say how to launch it rather than fail in the layout check."""
    needed, world = cfg.parallel.model_parallel_size, world_size_from_env()
    if world % needed == 0:
        return
    par = cfg.parallel
    raise ConfigError(f"this config is laid out TP{par.tensor_parallel} x PP{par.pipeline_parallel} ({needed} ranks) "
                      f"but this run has {world}: start it with NPROC_PER_NODE={needed} launch/torchrun.sh convert "
                      f"{action} ..., or check one process with parallel.tensor_parallel=1 "
                      "parallel.pipeline_parallel=1 parallel.virtual_pipeline=1")


def from_hf(cfg: ExperimentConfig) -> Path:
    """HF weights -> actor and critic trunk at the configured layout -> checkpoint iteration 0."""
    hf_path = _need_hf_path(cfg)
    _need_ranks(cfg, "from-hf")
    state = init_parallel(cfg)
    try:
        actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
        critic = make_trainable(build_critic(cfg.model, state, seed=cfg.trainer.seed), cfg.critic_optimizer,
                                cfg.parallel, state)
        load_hf_into(hf_path, cfg.model, state, actor=actor.unwrapped(), critic=critic.unwrapped())
        for model in (actor, critic):
            model.optimizer.reload_model_params()
        path = save_checkpoint(cfg.trainer.checkpoint_root, 0, {"actor": actor, "critic": critic}, state,
                               {"converted_from": str(hf_path)}, config=cfg, keep_last=cfg.trainer.keep_checkpoints)
        if state.rank == 0:
            print(f"converted {hf_path} -> {path}", flush=True)
        return path
    finally:
        destroy_parallel()


def to_hf(root: str, out_dir: str, *, which: str, iteration: int | None, dtype: str | None,
          overrides: Sequence[str]) -> Path:
    """A checkpoint's actor or critic -> an HF directory, at any layout (default: one process)."""
    directory = checkpoint_dir(root, iteration)
    cfg = load_config(directory / "config.yaml", [*SINGLE_PROCESS, *overrides])
    state = init_parallel(cfg)
    try:
        builders = {"actor": lambda: build_actor(cfg.model, state),
                    "critic": lambda: build_critic(cfg.model, state, seed=cfg.trainer.seed)}
        chunks = builders[which]()
        payload = load_checkpoint(root, {which: chunks}, state, iteration=read_trainer_state(directory)["iteration"],
                                  load_optimizer=False)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[dtype]
        out = export_hf(chunks, state, cfg.model, out_dir, critic=which == "critic", dtype=torch_dtype,
                        source_hf_dir=cfg.model.hf_path or None)
        if state.rank == 0:
            print(f"exported the {which} of {directory} (iteration {payload['iteration']}) to {out}", flush=True)
        return out
    finally:
        destroy_parallel()


def verify_hf(cfg: ExperimentConfig, *, tolerance: float) -> bool:
    """Load ``model.hf_path`` at the configured layout and compare logits with transformers."""
    hf_path = _need_hf_path(cfg)
    _need_ranks(cfg, "verify-hf")
    state = init_parallel(cfg)
    try:
        actor = build_actor(cfg.model, state)
        load_hf_into(hf_path, cfg.model, state, actor=actor)
        diff = verify_against_hf(actor, state, cfg.model, hf_path, seed=cfg.trainer.seed)
        ok = diff <= tolerance
        if state.rank == 0:
            print(f"max |logits - transformers logits| / max(1, max |logit|) = {diff:.3e} "
                  f"at TP{state.tensor_parallel} x PP{state.pipeline_parallel}: {'OK' if ok else 'FAILED'} "
                  f"(tolerance {tolerance:g})", flush=True)
        return ok
    finally:
        destroy_parallel()
