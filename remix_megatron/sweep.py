"""Sweeps: a YAML grid over config keys, run locally (torchrun, one point after another) or
submitted as Slurm jobs (launch/slurm.sbatch), then aggregated into one table and one plot.

A sweep file (see configs/sweeps/)::

    name: offpolicy_portion               # default: the file name
    config: configs/tiny_remix_ppo.yaml   # the base experiment
    grid:                                 # dotted key -> values; the runs are the cartesian product
      algorithm.off_policy_portion: [0.1, 0.2, 0.3, 0.4, 0.5]
    overrides: [trainer.num_steps=60]     # applied to every point (command-line overrides come after)
    out_dir: runs/sweeps/offpolicy_portion  # point runs in <out_dir>/<point>; default runs/sweeps/<name>
    nproc_per_node: 1                     # local runs: processes (Slurm: the config's cluster section)
    metrics: [eval_accuracy, reward_mean]  # columns of the table and panels of the plot

Every point's config is loaded and its layout checked (Slurm: its memory plan too) before
anything starts. A point whose metrics already reach ``trainer.num_steps`` is not run again,
and points resume from their checkpoints, so re-running a sweep completes it.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from remix_megatron.config import ConfigError, ExperimentConfig, load_config
from remix_megatron.fileio import atomic_write_text
from remix_megatron.metrics_log import against_rollouts, curve, describe, pyplot, save_figure
from remix_megatron.planning import format_memory, plan_memory
from remix_megatron.rundir import read_metrics
from remix_megatron.validation import training_problems, validate

LAUNCH_DIR = Path(__file__).resolve().parent.parent / "launch"
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "NODE_RANK", "NNODES", "RDZV_ID")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")  # one directory-name component
DEFAULT_METRICS = ("eval_accuracy", "reward_mean", "response_length", "actor/ratio_mean", "self_reflection_rate")


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    name: str
    config: str
    grid: dict[str, list]
    overrides: list[str] = field(default_factory=list)
    out_dir: str = ""
    nproc_per_node: int = 1
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))

    def __post_init__(self) -> None:
        if not self.grid or any(not isinstance(v, list) or not v for v in self.grid.values()):
            raise ConfigError(f"sweep {self.name!r}: grid must map dotted config keys to non-empty lists of values")
        if self.nproc_per_node < 1:
            raise ConfigError(f"sweep {self.name!r}: nproc_per_node={self.nproc_per_node} must be >= 1")
        if not self.out_dir and not _SAFE_NAME.fullmatch(str(self.name)):  # it becomes runs/sweeps/<name>
            raise ConfigError(f"sweep name {self.name!r}: use letters, digits and _ . + - only, or set out_dir")

    @property
    def root(self) -> Path:
        return Path(self.out_dir or f"runs/sweeps/{self.name}")


@dataclass(frozen=True)
class SweepPoint:
    name: str  # directory name, e.g. "off_policy_portion-0.1_utd-2"
    values: dict[str, Any]  # grid key -> value
    overrides: list[str]  # everything after the base config, trainer.run_dir last
    run_dir: Path
    config: ExperimentConfig


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = set(data) - known if isinstance(data, dict) else {"<not a mapping>"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}")
    if "config" not in data or "grid" not in data:
        raise ConfigError(f"{path}: a sweep needs 'config' (the base experiment YAML) and 'grid'")
    return SweepSpec(**{"name": path.stem, **data})


def _dir_name(text: str) -> str:
    """``text`` as one directory-name component: every run of other characters (/, spaces, ..) becomes "_"."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("._") or "_"


def _scalar(value: Any) -> str:
    """A value as a YAML scalar for a dotted override (0.1, true, text)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def expand(spec: SweepSpec, extra_overrides: Sequence[str] = ()) -> list[SweepPoint]:
    """Every grid point with its loaded (hence validated) config, in the grid's order."""
    keys = list(spec.grid)
    points = []
    for values in itertools.product(*(spec.grid[key] for key in keys)):
        name = _dir_name("_".join(f"{key.split('.')[-1]}-{_scalar(value)}" for key, value in zip(keys, values)))
        if any(point.name == name for point in points):
            raise ConfigError(f"sweep {spec.name!r}: two grid points share the run directory {name!r} (values that "
                              "differ only in characters a directory name cannot hold)")
        run_dir = spec.root / name
        # wandb: the sweep's points are one group, each run named by its grid values (the command line may rename)
        overrides = [f"trainer.wandb_group={spec.name}", f"trainer.wandb_name={name}", *spec.overrides,
                     *(f"{k}={_scalar(v)}" for k, v in zip(keys, values)), *extra_overrides,
                     f"trainer.run_dir={run_dir}"]
        try:
            cfg = load_config(spec.config, overrides)
        except ConfigError as error:
            raise ConfigError(f"sweep point {name}: {error}") from None
        points.append(SweepPoint(name=name, values=dict(zip(keys, values)), overrides=overrides, run_dir=run_dir,
                                 config=cfg))
    return points


def check_points(spec: SweepSpec, points: Sequence[SweepPoint], *, slurm: bool) -> None:
    """Every check ``train`` makes on nproc_per_node ranks; on Slurm those that need none of the files the
    job reads on the nodes, and the memory plan of the cluster section."""
    for point in points:
        try:
            if not slurm:
                validate(point.config, spec.nproc_per_node)
                continue
            if not point.config.cluster.gpus_per_node:
                raise ConfigError("Slurm runs need cluster.nodes and cluster.gpus_per_node in the config")
            validate(point.config, training=False)
            for problem in training_problems(point.config):  # the job reads its files on the cluster's nodes
                print(f"[{point.name}] note: train will refuse this point unless the nodes see otherwise: {problem}")
            plan = plan_memory(point.config)
            if not plan.fits:
                raise ConfigError("the memory plan does not fit:\n" + format_memory(plan))
        except ConfigError as error:
            raise ConfigError(f"sweep point {point.name}: {error}") from None


def command(spec: SweepSpec, point: SweepPoint, *, slurm: bool) -> list[str]:
    if slurm:
        cluster = point.config.cluster
        return ["sbatch", f"--job-name={spec.name}-{point.name}", f"--nodes={cluster.nodes}",
                f"--gpus-per-node={cluster.gpus_per_node}", str(LAUNCH_DIR / "slurm.sbatch"), spec.config,
                *point.overrides]
    return ["bash", str(LAUNCH_DIR / "torchrun.sh"), "train", spec.config, *point.overrides]


def finished(point: SweepPoint) -> bool:
    history = read_metrics(point.run_dir / "metrics.jsonl")
    return bool(history) and history[-1].get("iteration", 0) >= point.config.trainer.num_steps


def _run_logged(cmd: list[str], env: dict, log_path: Path) -> int:
    """Run ``cmd`` with its output shown live and kept in ``log_path``; returns its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
    return process.returncode


_RANK_PREFIX = re.compile(r"^\[(?:default)?(?:rank)?\d+\]:")  # what torch prefixes to a worker's traceback lines
#: a worker's own error line: the CLI's "<kind> error: ..." or a raised exception's last line
_ERROR_LINE = re.compile(r"^(?:[a-z]+ error: |(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Interrupt)\b.*: )")


def point_error(log_text: str) -> str:
    """The failing point's own error in its log: the last error line a worker printed, not the report of
    torchrun's elastic agent (ChildFailedError and its failure table) that follows it."""
    for line in reversed(log_text.splitlines()):
        line = _RANK_PREFIX.sub("", line).strip()
        if _ERROR_LINE.match(line) and "elastic" not in line and "ChildFailedError" not in line:
            return line
    return "no error line in its output"


def launch(spec: SweepSpec, points: Sequence[SweepPoint], *, slurm: bool, dry_run: bool) -> list[dict]:
    """Run (or, with ``dry_run``, print) each point's command; returns what was done per point."""
    # Each point is its own job: no rendezvous settings leak in from a launcher this sweep runs under.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")}
    env.update(NPROC_PER_NODE=str(spec.nproc_per_node), PYTHON=os.environ.get("PYTHON", sys.executable))
    prefix = "" if slurm else f"NPROC_PER_NODE={spec.nproc_per_node} "  # what the local command runs with
    done = []
    for point in points:
        cmd = command(spec, point, slurm=slurm)
        entry = {"point": point.name, "values": point.values, "run_dir": str(point.run_dir), "command": cmd}
        if not slurm and finished(point):
            print(f"[{point.name}] finished earlier: skipped", flush=True)
            done.append({**entry, "status": "skipped"})
            continue
        print(f"[{point.name}] {prefix}{' '.join(cmd)}", flush=True)
        if dry_run:
            done.append({**entry, "status": "dry-run"})
            continue
        if slurm:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"sweep point {point.name}: sbatch failed (exit {result.returncode}): "
                                   f"{result.stderr.strip()}")
            status = result.stdout.strip()  # "Submitted batch job N"
            print(f"[{point.name}] {status}", flush=True)
        else:
            log_path = point.run_dir / "sweep_point.log"
            returncode = _run_logged(cmd, env, log_path)
            if returncode != 0:
                raise RuntimeError(f"sweep point {point.name} failed (exit {returncode}): "
                                   f"{point_error(log_path.read_text())}\n  its full output: {log_path}")
            status = "done"
        done.append({**entry, "status": status})
    return done


# ------------------------------------------------------------------------------ aggregation


def summary_rows(spec: SweepSpec, points: Sequence[SweepPoint]) -> list[dict]:
    """One row per point: its grid values, iterations, rollouts and each metric's last logged value."""
    rows = []
    for point in points:
        history = read_metrics(point.run_dir / "metrics.jsonl")
        row = {"point": point.name, **point.values,
               "iterations": max((r.get("iteration", 0) for r in history), default=0),
               "rollouts_total": max((r.get("rollouts_total", 0) for r in history), default=0)}
        for metric in spec.metrics:
            values = [r[metric] for r in history if metric in r]
            row[metric] = values[-1] if values else None
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_summary(spec: SweepSpec, points: Sequence[SweepPoint]) -> list[Path]:
    """``summary.csv``, ``summary.md`` and ``sweep.png`` in the sweep's directory; returns their paths."""
    rows = summary_rows(spec, points)
    root = spec.root
    root.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(root / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    atomic_write_text(root / "summary.md", f"# sweep {spec.name} ({spec.config})\n\n" + "\n".join(table) + "\n")
    return [root / "summary.csv", root / "summary.md", *_plot(spec, points, root / "sweep.png")]


def _plot(spec: SweepSpec, points: Sequence[SweepPoint], path: Path) -> list[Path]:
    """One panel per metric against rollouts generated (the paper's cost axis), one line per point."""
    plt = pyplot()
    histories = {point.name: read_metrics(point.run_dir / "metrics.jsonl") for point in points}
    metrics = [m for m in spec.metrics if any(m in r for h in histories.values() for r in h)]
    if not metrics:
        return []
    figure, axes = plt.subplots(len(metrics), 1, figsize=(8, 3.6 * len(metrics)), squeeze=False)
    for axis, metric in zip(axes[:, 0], metrics):
        for name, history in histories.items():
            points_xy = curve(history, metric)
            if points_xy:
                axis.plot(*zip(*points_xy), marker="o" if len(points_xy) < 30 else None, markersize=3, label=name)
        title, ylabel = describe(metric)
        against_rollouts(axis, title, ylabel=ylabel, legend=True)
    return [save_figure(figure, path)]


def run(path: str, overrides: Sequence[str] = (), *, slurm: bool = False, dry_run: bool = False,
        aggregate_only: bool = False) -> int:
    """The ``remix-megatron sweep`` command."""
    spec = load_sweep(path)
    points = expand(spec, overrides)
    print(f"sweep {spec.name}: {len(points)} points of {spec.config} in {spec.root}", flush=True)
    if not aggregate_only:
        check_points(spec, points, slurm=slurm)
        done = launch(spec, points, slurm=slurm, dry_run=dry_run)
        if not dry_run:
            spec.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(spec.root / "sweep.json", json.dumps({"sweep": str(path), "slurm": slurm,
                                                                     "points": done}, indent=1))
        if slurm or dry_run:
            if slurm and not dry_run:
                print(f"submitted; when the jobs are done: remix-megatron sweep {path} --aggregate-only", flush=True)
            return 0
    elif not any(read_metrics(point.run_dir / "metrics.jsonl") for point in points):
        raise RuntimeError(f"no point of sweep {spec.name} has metrics in {spec.root} yet: nothing to aggregate "
                           "(run the sweep first, or wait for its Slurm jobs)")
    for written in write_summary(spec, points):
        print(f"wrote {written}", flush=True)
    print((spec.root / "summary.md").read_text(), flush=True)
    return 0
