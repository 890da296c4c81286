"""Distributed checkpoints: models, optimizers, RNG and trainer state; exact resume.

Layout under a checkpoint root::

    latest                       the newest complete checkpoint's directory name
    iter_0000012/dist/           megatron dist_checkpointing (torch_dist): every model's and
                                 optimizer's tensors, resharded on load to any TP/PP layout
    iter_0000012/trainer_state.json   iteration, schedule/sampler/counter state, layout (JSON)
    iter_0000012/rng/rank_00003.{safetensors,json}   each rank's RNG streams

A checkpoint is written into ``iter_X.tmp`` and renamed by rank 0 once every rank has
finished; only then does ``latest`` move (written atomically). A crash while saving leaves
``latest`` on the previous checkpoint; the ``.tmp`` remains are deleted by the next save.
Our own files are JSON and safetensors; megatron's format pickles its metadata, which
``load_checkpoint`` reads through an unpickler that admits only the metadata classes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from remix_megatron.compat import distributed_optimizer_loads_into_torch_adam, in_process_checkpoint_writes
from remix_megatron.config import ExperimentConfig, to_yaml
from remix_megatron.fileio import atomic_write_text
from remix_megatron.models.optimizer import TrainableModel
from remix_megatron.parallel import ParallelState

CHECKPOINT_VERSION = 1
_DIR = re.compile(r"^iter_(\d{7})$")
Model = Union[TrainableModel, Sequence[torch.nn.Module]]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong."""


def _dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration ``latest`` points at, or None when there is no complete checkpoint."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    match = _DIR.match(pointer.read_text().strip())
    if match is None or not (Path(root) / pointer.read_text().strip()).is_dir():
        raise CheckpointError(f"{pointer} names {pointer.read_text().strip()!r}, which is not a checkpoint in {root}")
    return int(match.group(1))


def _chunks(model: Model) -> list[torch.nn.Module]:
    return model.unwrapped() if isinstance(model, TrainableModel) else list(model)


# The distributed optimizer's format (the other optimizers ignore it). megatron-core 0.16.1's default,
# fully_sharded_model_space, builds flattened ShardedTensors that its own dist_checkpointing refuses
# ("ShardedTensor.flattened_range is not supported"); fully_reshardable all-gathers each state tensor
# over the DP group into model-parameter shapes: resharded on load to any TP/PP/DP layout. Not its
# memory-efficient variant: that gathers over the gloo DP groups, which the optimizer does not hold.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _distributed_optimizer(models: Mapping[str, Model]) -> bool:
    """Whether any of ``models`` steps with megatron's DistributedOptimizer (its state has its own format)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(optimizer, DistributedOptimizer) for model in models.values()
               if isinstance(model, TrainableModel)
               for optimizer in getattr(model.optimizer, "chained_optimizers", [model.optimizer]))


def _sharded_state(models: Mapping[str, Model], state: ParallelState, *, is_loading: bool, with_optimizer: bool
                   ) -> dict:
    """{name: {"model0": ..., ["optimizer": ...]}} with ShardedTensor keys prefixed by the model name."""
    out = {}
    for name, model in models.items():
        # the DP group that numbers replicas; without it megatron reads its global one
        entry = {f"model{i}": chunk.sharded_state_dict(prefix=f"{name}.",
                                                       metadata={"dp_cp_group": state.pg_collection.dp_cp})
                 for i, chunk in enumerate(_chunks(model))}
        if with_optimizer and isinstance(model, TrainableModel):
            model.ensure_optimizer_state()
            entry["optimizer"] = model.optimizer.sharded_state_dict(dict(entry), is_loading=is_loading,
                                                                    metadata=_OPTIMIZER_METADATA)
        out[name] = entry
    return out


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for key, value in get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{key}"] = value
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    plain = {"python": [python_state[0], list(python_state[1]), python_state[2]],
             "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, plain


def _set_rng_state(tensors: Mapping[str, torch.Tensor], plain: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    get_cuda_rng_tracker().set_states({k[len("tracker."):]: v for k, v in tensors.items() if k.startswith("tracker.")})
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _layout(state: ParallelState) -> dict:
    return {"world_size": state.world_size, "tensor_parallel": state.tensor_parallel,
            "pipeline_parallel": state.pipeline_parallel, "virtual_pipeline": state.virtual_pipeline,
            "data_parallel": state.data_parallel}


def save_checkpoint(root: str | os.PathLike, iteration: int, models: Mapping[str, Model], state: ParallelState,
                    trainer_state: Mapping, *, config: ExperimentConfig, keep_last: int = 2) -> Path:
    """Save everything (collective over all ranks); returns the checkpoint directory.

    ``config`` is written beside the weights (config.yaml), so that tools such as the HF
    export can rebuild the models from the checkpoint alone.
    """
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    root = Path(root)
    final, staging = root / _dirname(iteration), root / (_dirname(iteration) + ".tmp")
    if state.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("iter_*.tmp"):
            shutil.rmtree(leftover)
        (staging / "dist").mkdir(parents=True)
        (staging / "rng").mkdir()
    dist.barrier()
    in_process_checkpoint_writes()
    try:
        dist_checkpointing.save(_sharded_state(models, state, is_loading=False, with_optimizer=True),
                                str(staging / "dist"))
        tensors, plain = _rng_state()
        save_file(tensors, str(staging / "rng" / f"rank_{state.rank:05d}.safetensors"))
        (staging / "rng" / f"rank_{state.rank:05d}.json").write_text(json.dumps(plain))
    except (OSError, RuntimeError, CheckpointException) as error:  # how torch reports a failed write() on every rank
        raise CheckpointError(_write_failure(root, staging, error)) from error
    dist.barrier()
    if state.rank == 0:
        payload = {"version": CHECKPOINT_VERSION, "iteration": iteration, "layout": _layout(state),
                   "distributed_optimizer": _distributed_optimizer(models), "models": sorted(models),
                   "trainer_state": dict(trainer_state)}
        atomic_write_text(staging / "trainer_state.json", json.dumps(payload, indent=1))
        atomic_write_text(staging / "config.yaml", to_yaml(config, header={"saved_at_iteration": iteration}))
        _publish(staging, final)
        atomic_write_text(root / "latest", final.name)
        for old in sorted(p for p in root.iterdir() if _DIR.match(p.name))[:-keep_last] if keep_last > 0 else []:
            if old != final:
                shutil.rmtree(old)
    dist.barrier()
    return final


def _write_failure(root: Path, staging: Path, error: BaseException) -> str:
    """What a failed checkpoint write tells the user: the cause, the free space, what is still usable."""
    cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    free = shutil.disk_usage(root).free
    try:
        last = latest_iteration(root)
        previous = "no checkpoint is complete yet" if last is None else f"'latest' still names iteration {last}"
    except CheckpointError:
        previous = "'latest' is unreadable"
    return (f"cannot write the checkpoint {staging} ({cause}); {free / 2**30:.2f} GiB free on its filesystem: a full "
            f"disk, a quota or a file size limit? {previous}; the partial {staging.name} is removed at the next save")


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished staging directory into place (a separate function: tests hang here)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def checkpoint_dir(root: str | os.PathLike, iteration: int | None = None) -> Path:
    """The directory of checkpoint ``iteration`` (default: ``latest``) under ``root``."""
    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"no complete checkpoint in {root} (no 'latest')")
    directory = Path(root) / _dirname(iteration)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} does not exist (checkpoints in {root}: "
                              f"{sorted(p.name for p in Path(root).glob('iter_*')) or 'none'})")
    return directory


# Every global a torch dist-checkpoint ``.metadata`` pickle names (torch 2.13, megatron-core
# 0.16.1): the metadata dataclasses and enums, torch.Size, dtypes and layouts, and the path
# torch's own writer keeps as the checkpoint id. Anything else
# (os.system, builtins.exec, ...) would be code run by merely opening the checkpoint.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the checkpoint metadata's own classes (and torch dtypes); refuses every other global."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a checkpoint metadata class")


def check_dist_metadata(dist_dir: str | os.PathLike) -> None:
    """Read every ``.metadata`` pickle of a dist checkpoint through ``_MetadataUnpickler``: a CheckpointError
    names a file that would run code (or is not metadata) before megatron's plain ``pickle.load`` opens it.

    Megatron reads the checked file again afterwards; a file replaced in between is out of reach
    here (whoever can write the checkpoint during the load could as well replace the code).
    """
    files = sorted(Path(dist_dir).glob("*.metadata"))
    if not files:
        raise CheckpointError(f"{dist_dir} holds no .metadata: not a complete dist checkpoint")
    for path in files:
        try:
            with open(path, "rb") as handle:
                _MetadataUnpickler(handle).load()
        except Exception as error:  # any failure means the file is not plain metadata
            raise CheckpointError(f"{path}: unsafe or corrupted checkpoint metadata ({error}); load checkpoints "
                                  "only from sources you trust") from None


def read_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    path = Path(checkpoint_dir) / "trainer_state.json"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint_dir} is not a complete checkpoint (no trainer_state.json)") from None
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')}, this code reads "
                              f"{CHECKPOINT_VERSION}")
    return payload


def load_checkpoint(root: str | os.PathLike, models: Mapping[str, Model], state: ParallelState, *,
                    iteration: int | None = None, load_optimizer: bool = True) -> dict:
    """Load a checkpoint (``latest`` by default) into ``models`` at this rank's layout.

    Returns the saved payload (``iteration``, ``trainer_state``, ``layout``). RNG streams are
    restored when the layout is the one saved; otherwise they keep their fresh seeds (the
    model and optimizer tensors are resharded either way).
    """
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    directory = checkpoint_dir(root, iteration)
    payload = read_trainer_state(directory)
    missing = sorted(set(models) - set(payload["models"]))
    if missing:
        raise CheckpointError(f"{directory} holds models {payload['models']}, not {missing}")
    # checkpoints from before the key could not hold a distributed optimizer (its save failed)
    saved_distributed = payload.get("distributed_optimizer", False)
    if load_optimizer and saved_distributed != _distributed_optimizer(models):
        raise CheckpointError(f"{directory} holds the optimizer state of a run with parallel.use_distributed_optimizer="
                              f"{str(saved_distributed).lower()}, a format this run's optimizer cannot load: resume "
                              "with the same setting")
    check_dist_metadata(directory / "dist")
    distributed_optimizer_loads_into_torch_adam()
    sharded = _sharded_state(models, state, is_loading=True, with_optimizer=load_optimizer)
    try:
        with warnings.catch_warnings():
            # megatron-core 0.16.1's torch_dist loader calls torch's deprecated load_state_dict and builds
            # ShardedTensors: two FutureWarnings on every load that no caller can act on (megatron's to fix)
            warnings.filterwarnings("ignore", category=FutureWarning, message=r"`load_state_dict` is deprecated")
            warnings.filterwarnings("ignore", category=FutureWarning, message=r"Please use DTensor instead")
            loaded = dist_checkpointing.load(sharded, str(directory / "dist"))
    except Exception as error:  # megatron raises several types; keep the cause, name the checkpoint
        raise CheckpointError(f"cannot load {directory / 'dist'} into this model: {error}") from error
    for name, model in models.items():
        for i, chunk in enumerate(_chunks(model)):
            prefix = f"{name}."
            chunk.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v
                                   for k, v in loaded[name][f"model{i}"].items()}, strict=True)
        if load_optimizer and isinstance(model, TrainableModel):
            model.optimizer.load_state_dict(loaded[name]["optimizer"])
        elif isinstance(model, TrainableModel):
            model.optimizer.reload_model_params()
    if payload["layout"] == _layout(state):
        rng = directory / "rng" / f"rank_{state.rank:05d}"
        _set_rng_state(load_file(str(rng.with_suffix(".safetensors"))),
                       json.loads(rng.with_suffix(".json").read_text()))
    return payload
