"""The run directory across restarts: what a (re)started run finds, checked before anything
heavy runs, and its store and metrics brought back to the checkpoint it resumes from.

A run directory holds ``config.yaml`` (written at start), ``metrics.jsonl`` (one record per
completed iteration, plus iteration 0's evaluation), ``store/``, ``checkpoints/``, plots,
``eval/`` and, once finished, ``hf_actor/``. An iteration's metrics record is written before
its checkpoint, so the checkpoint a run resumes from has every record up to its iteration;
at (re)start everything newer than that checkpoint (or everything, without one) is dropped
from the store and the metrics, and the iterations after it run again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from remix_megatron.checkpoint import checkpoint_dir, latest_iteration
from remix_megatron.config import ConfigError, ExperimentConfig, config_to_dict
from remix_megatron.fileio import atomic_write_text

# What a resumed run must share with its checkpoint: a different value would silently
# change the experiment half-way (the sampler's replay plan, the losses, the schedules).
RESUME_INVARIANTS = ("algorithm", "rollout.prompts_per_step", "rollout.responses_per_prompt",
                     "trainer.global_batch_size")
# What a run writes into its directory besides the store and checkpoints (trainer.overwrite
# removes these and the run's store and checkpoint root, nothing else).
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "hf_actor", "eval", "wandb", "tensorboard")


def store_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.store.path or Path(cfg.trainer.run_dir) / "store")


def _is_store(path: Path) -> bool:
    return (path / "STORE.json").is_file()


def _is_checkpoint_root(path: Path) -> bool:
    return (path / "latest").exists() or any(path.glob("iter_*"))


def _has_previous_run(cfg: ExperimentConfig) -> list[Path]:
    """The outputs of an earlier run found where this one would write (store iterations, checkpoints, metrics)."""
    store, checkpoints = store_root(cfg), Path(cfg.trainer.checkpoint_root)
    found = []
    if _is_store(store) and (any(store.glob("manifests/*")) or any(store.glob("iter_*"))):
        found.append(store)
    if _is_checkpoint_root(checkpoints):
        found.append(checkpoints)
    if (Path(cfg.trainer.run_dir) / "metrics.jsonl").is_file():
        found.append(Path(cfg.trainer.run_dir) / "metrics.jsonl")
    return found


def check_writable(*directories: Path) -> None:
    """Create each directory and a file in it; a clear error now instead of after the model build."""
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as error:
            raise ConfigError(f"{directory} is not writable ({error.strerror}): choose another trainer.run_dir "
                              "(or trainer.checkpoint_dir / store.path)") from None


def remove_previous_run(cfg: ExperimentConfig) -> list[Path]:
    """trainer.overwrite: delete the earlier run's outputs (only the files a run writes); returns them."""
    run_dir, store, checkpoints = Path(cfg.trainer.run_dir), store_root(cfg), Path(cfg.trainer.checkpoint_root)
    targets = [run_dir / name for name in RUN_OUTPUTS] + sorted(run_dir.glob("*.png"))
    targets += [store] if _is_store(store) else []
    targets += [checkpoints] if _is_checkpoint_root(checkpoints) else []
    removed = []
    for path in dict.fromkeys(targets):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def _differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every RESUME_INVARIANTS value that differs."""
    out = []
    for key in RESUME_INVARIANTS:
        section, _, field = key.partition(".")
        old, new = saved.get(section, {}), current[section]
        pairs = [(f"{section}.{f}", old.get(f), v) for f, v in new.items()] if not field else \
            [(key, old.get(field), new[field])]
        out += [f"{name}: {a!r} -> {b!r}" for name, a, b in pairs if a != b]
    return out


def check_resume_config(cfg: ExperimentConfig, iteration: int) -> None:
    """The checkpoint's saved config.yaml against this one: a changed algorithm or batch is a ConfigError."""
    path = checkpoint_dir(cfg.trainer.checkpoint_root, iteration) / "config.yaml"
    if not path.is_file():
        return  # checkpoints from before config.yaml was saved beside them
    changed = _differences(yaml.safe_load(path.read_text()) or {}, config_to_dict(cfg))
    if changed:
        raise ConfigError(f"resuming {cfg.trainer.run_dir} from iteration {iteration} with a different setup "
                          f"({'; '.join(changed)}; saved in {path}): keep the saved values, or start a new run "
                          "(a new trainer.run_dir, or trainer.overwrite=true)")


def finished_iteration(cfg: ExperimentConfig, iteration: int | None) -> bool:
    """Whether the run already reached trainer.num_steps and exported its actor after that checkpoint."""
    if iteration is None or iteration < cfg.trainer.num_steps:
        return False
    exported = Path(cfg.trainer.run_dir) / "hf_actor" / "config.json"
    pointer = Path(cfg.trainer.checkpoint_root) / "latest"
    return exported.is_file() and exported.stat().st_mtime_ns >= pointer.stat().st_mtime_ns


def check_run_dir(cfg: ExperimentConfig, *, rank: int, barrier) -> int | None:
    """Before anything heavy, on every rank: the checkpoint iteration this run resumes from (None = from scratch).

    Raises ConfigError for an unwritable directory, for ``trainer.resume=false`` where an
    earlier run left outputs (unless ``trainer.overwrite=true``: rank 0 removes them between
    two calls of ``barrier``, once every rank has looked) and for a resume whose config
    changed the algorithm or the batch.
    """
    run_dir = Path(cfg.trainer.run_dir)
    check_writable(run_dir, Path(cfg.trainer.checkpoint_root), store_root(cfg))
    previous = _has_previous_run(cfg)
    if cfg.trainer.overwrite:
        barrier()
        if rank == 0 and previous:
            print(f"trainer.overwrite=true: removing the earlier run ({', '.join(map(str, previous))})", flush=True)
            remove_previous_run(cfg)
        barrier()
        return None
    if previous and not cfg.trainer.resume:
        raise ConfigError(f"trainer.resume=false but {run_dir} already holds a run ({', '.join(map(str, previous))}): "
                          "use a new trainer.run_dir, resume it (trainer.resume=true), or replace it with "
                          "trainer.overwrite=true")
    iteration = latest_iteration(cfg.trainer.checkpoint_root) if cfg.trainer.resume else None
    if iteration is not None:
        check_resume_config(cfg, iteration)
    return iteration


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut by a kill is dropped (every complete line is kept)."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ConfigError(f"{path}:{number}: not a JSON record; repair or remove the line") from None
            print(f"{path}:{number}: dropping a record cut off by a kill", flush=True)
    return records


def restore_metrics(run_dir: Path, checkpoint: int | None) -> list[dict]:
    """Keep the records up to the checkpoint's iteration (one per iteration: the last written), rewrite the file.

    Returns them in iteration order. From scratch (no checkpoint) nothing is kept: iteration 0's
    evaluation runs again.
    """
    path = run_dir / "metrics.jsonl"
    by_iteration = {int(r["iteration"]): r for r in read_metrics(path)
                    if checkpoint is not None and int(r["iteration"]) <= checkpoint}
    kept = [by_iteration[k] for k in sorted(by_iteration)]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def restore_run(cfg: ExperimentConfig, store, checkpoint: int | None) -> list[dict]:
    """Rank 0: the store and metrics back to ``checkpoint`` (or empty); returns the metrics kept."""
    removed = store.truncate_after(checkpoint or 0)
    if removed:
        print(f"store: removed iterations {removed[0]}..{removed[-1]}, newer than the "
              f"{'checkpoint of iteration ' + str(checkpoint) if checkpoint else 'start (no checkpoint)'}", flush=True)
    return restore_metrics(Path(cfg.trainer.run_dir), checkpoint)

