"""Run logging: JSONL metrics and PNG plots in the run directory, and wandb (offline unless a key).

Only rank 0 writes. wandb is imported only when ``trainer.wandb_project`` is set; without
``WANDB_API_KEY`` it runs in offline mode and says where the run directory is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

PLOTS = (  # (file, y key, title): each against rollouts generated, the paper's cost axis
    ("accuracy.png", "eval_accuracy", "held-out accuracy"),
    ("response_length.png", "response_length", "mean response length (tokens)"),
    ("importance_ratio.png", "actor/ratio_mean", "mean importance ratio pi/b"),
    ("self_reflection.png", "self_reflection_rate", "self-reflection rate"),
    ("reward.png", "reward_mean", "mean reward (fresh rollouts)"),
)


class RunLog:
    def __init__(self, run_dir: Path, *, active: bool, wandb_project: str = "", config: dict | None = None) -> None:
        self.run_dir, self.active = Path(run_dir), active
        self.path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), mode=mode, config=config or {})
            print(f"wandb ({mode}) run directory: {self._wandb.dir}", flush=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                            step=int(record["iteration"]))

    def close(self, history: Sequence[dict]) -> list[Path]:
        """Write the plots; finish wandb. Returns the PNG paths."""
        if not self.active:
            return []
        paths = write_plots(history, self.run_dir)
        if self._wandb is not None:
            self._wandb.finish()
        return paths


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def against_rollouts(axis, title: str, *, ylabel: str | None = None, legend: bool = False) -> None:
    """Label an axis whose x is rollouts generated (the paper's cost unit), as every plot here does."""
    axis.set_xlabel("rollouts generated")
    if ylabel:
        axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if legend:
        axis.legend(fontsize=7)


def save_figure(figure, path: Path, dpi: int = 100) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path


def curve(history: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """(rollouts_total, value) of every record that has ``key``."""
    return [(r.get("rollouts_total", 0), r[key]) for r in history if key in r]


def write_plots(history: Sequence[dict], out_dir: Path) -> list[Path]:
    plt = pyplot()
    paths = []
    for file, key, title in PLOTS:
        points = curve(history, key)
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(5, 3.2))
        axis.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        against_rollouts(axis, title)
        paths.append(save_figure(figure, out_dir / file))
    benchmarks = sorted({key for r in history for key in r if key.startswith("eval/") and key.count("/") == 1})
    if benchmarks:  # periodic benchmark scores (data.eval_benchmarks), one line each
        figure, axis = plt.subplots(figsize=(5, 3.2))
        for key in benchmarks:
            points = curve(history, key)
            axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key[5:])
        against_rollouts(axis, "benchmark scores (pass@1 / avg@k)", legend=True)
        paths.append(save_figure(figure, out_dir / "benchmarks.png"))
    return paths
