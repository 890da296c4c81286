"""What a training run prints: start-up progress, events, and one line per iteration.

Rank 0 prints; every line is flushed, so a log under torchrun or Slurm shows where a run is.
Start-up lines begin with ``[start]`` and events (resume, reincarnation, checkpoints,
evaluations) with ``[event]``, so ``grep`` finds them in a long log.
"""

from __future__ import annotations

from typing import Sequence

#: short names for the console line; any other key is shown as it is in metrics.jsonl
LABELS = {"reward_mean": "reward", "response_length": "length", "actor/pg_loss": "loss", "actor/kl_ref": "kl_ref",
          "actor/kl_prev": "kl_prev", "actor/lr": "lr", "actor/ratio_mean": "ratio", "actor/clip_frac": "clip",
          "actor/entropy": "entropy", "critic/value_loss": "value_loss"}


def say(kind: str, text: str, *, active: bool = True) -> None:
    """One ``[start]`` / ``[event]`` line (only where ``active``: rank 0)."""
    if active:
        print(f"[{kind}] {text}", flush=True)


def format_value(value: float) -> str:
    """Three decimals in the usual range, scientific for the very small and large (lr 2.00e-04)."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3f}"
    return f"{value:.2e}"


def format_rate(count: float, seconds: float) -> str:
    """Items per second with three significant digits (0.35, 12.4, 310), never a rounded-off 0."""
    return f"{count / max(seconds, 1e-9):.3g}"


def iteration_line(k: int, num_steps: int, record: dict, metrics: Sequence[str]) -> str:
    """``[k/N] reward 0.312 length 23.100 ... rollouts 96 | 3.1 s/it, 31 rollouts/s, ~5.1 min left``."""
    shown = " ".join(f"{LABELS.get(key, key)} {format_value(record[key])}" for key in metrics if key in record)
    seconds = record["time/iteration_s"]
    remaining = (num_steps - k) * seconds
    return (f"[{k}/{num_steps}] {shown} rollouts {record['rollouts_total']} | {seconds:.1f} s/it, "
            f"{format_rate(record['rollouts'], seconds)} rollouts/s, ~{remaining / 60:.1f} min left")
