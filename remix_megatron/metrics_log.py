"""Run logging: JSONL metrics and PNG plots in the run directory, plus wandb and TensorBoard.

Only rank 0 writes. ``metrics.jsonl`` is always written; ``trainer.loggers`` adds wandb and
TensorBoard, which take the same metric names and are imported only when chosen. wandb decides
its own mode as documented upstream (``WANDB_MODE``, else online when it finds credentials in
``WANDB_API_KEY``, ``~/.netrc`` from ``wandb login`` or its settings); without either it runs
offline here and says which directory ``wandb sync`` wants.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from remix_megatron.config import ConfigError, TrainerConfig
from remix_megatron.registry import Registry


@dataclass(frozen=True)
class PlotSpec:
    """One PNG of the run directory: ``keys`` (or every key matching ``pattern``) against rollouts."""

    file: str
    title: str
    ylabel: str
    keys: tuple[str, ...] = ()
    pattern: str = ""  # a regex over metric keys, e.g. r"actor/ratio_mean/age\d+$"; group(1) labels the line
    optional: bool = False  # drawn only when one of its metrics is in the run (diagnostics another part adds)

    def metrics(self, histories: Sequence[Sequence[dict]]) -> list[str]:
        if not self.pattern:
            return list(self.keys)
        found = {key for history in histories for record in history for key in record if re.match(self.pattern, key)}
        return [*self.keys, *sorted(found, key=_natural)]


def _natural(key: str) -> tuple:
    """Sort age2 before age10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


PLOTS = (  # every plot is against rollouts generated, the paper's cost axis
    PlotSpec("accuracy.png", "held-out accuracy (greedy)", "accuracy (fraction correct)", ("eval_accuracy",)),
    PlotSpec("reward.png", "mean reward of fresh rollouts", "reward (fraction correct)", ("reward_mean",)),
    PlotSpec("response_length.png", "mean response length", "tokens", ("response_length",)),
    PlotSpec("importance_ratio.png", "importance ratio pi_theta / behaviour, by sample age", "ratio",
             ("actor/ratio_mean",), pattern=r"actor/ratio_mean/age\d+$"),
    PlotSpec("kl.png", "KL to the reference and to the precedent policy", "KL per token (nats)",
             ("actor/kl_ref", "actor/kl_prev")),
    PlotSpec("entropy.png", "policy entropy", "nats per token", ("actor/entropy",)),
    PlotSpec("clip_fraction.png", "clipped share of tokens (policy loss)", "fraction of tokens",
             ("actor/clip_frac",)),
    PlotSpec("self_reflection.png", "self-reflection rate of fresh rollouts", "fraction of responses",
             ("self_reflection_rate",)),
    PlotSpec("drift_prev_fresh.png", "precedent policy vs fresh rollouts", "per token",
             ("drift/kl_prev_fresh", "drift/tv_prev_fresh"), optional=True),
    PlotSpec("drift_ratio_deviation.png", "|w - 1| by sample age", "mean |w - 1|",
             pattern=r"drift/abs_w_minus_1/age\d+$", optional=True),
    PlotSpec("drift_outside_window.png", "ratios outside the clip window, by sample age", "fraction of tokens",
             pattern=r"drift/outside_window/age\d+$", optional=True),
    PlotSpec("drift_malformed.png", "malformed responses", "fraction of responses", ("drift/malformed_rate",),
             optional=True),
)
#: readable names of metric keys in legends and titles (sweep.png, `remix-megatron plot`)
LABELS = {"eval_accuracy": "held-out accuracy", "reward_mean": "reward", "response_length": "response length",
          "actor/ratio_mean": "all ages", "actor/kl_ref": "KL to reference", "actor/kl_prev": "KL to precedent",
          "actor/entropy": "entropy", "actor/clip_frac": "clip fraction", "self_reflection_rate": "self-reflection",
          "drift/kl_prev_fresh": "KL(precedent || behaviour)", "drift/tv_prev_fresh": "total variation",
          "drift/malformed_rate": "malformed"}


def label(key: str) -> str:
    """A legend name for a metric key: ``actor/ratio_mean/age2`` -> ``age 2``."""
    age = re.search(r"/age(\d+)$", key)
    if age:
        return f"age {age.group(1)}"
    return LABELS.get(key, key.removeprefix("eval/"))


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record (booleans as 0/1): what wandb and TensorBoard take."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(float(v))}


def wandb_credentials_found() -> bool:
    """Whether wandb would find an API key (WANDB_API_KEY, ~/.netrc from `wandb login`, its settings), by
    its own lookup and without a request (``wandb.Api()`` verifies the key over the network)."""
    import wandb

    settings = wandb.Settings()
    if os.environ.get("WANDB_API_KEY") or settings.api_key:
        return True
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # older wandb releases: the lookup lived in apikey
        from wandb.sdk.lib import apikey

        return bool(apikey.api_key(settings=settings))
    return bool(wbauth.read_netrc_auth(host=settings.base_url))


class WandbLogger:
    def __init__(self, trainer: TrainerConfig, run_dir: Path, config: dict) -> None:
        import wandb

        # WANDB_MODE (online | offline | disabled) or found credentials: wandb's own choice; else offline
        mode = None if os.environ.get("WANDB_MODE") or wandb_credentials_found() else "offline"
        self.run = wandb.init(project=trainer.wandb_project, entity=trainer.wandb_entity or None,
                              name=trainer.wandb_name or run_dir.resolve().name, group=trainer.wandb_group or None,
                              tags=list(trainer.wandb_tags) or None, dir=str(run_dir), mode=mode, config=config)
        chosen = self.run.settings.mode
        where = (f"; upload later with: wandb sync {self.run.settings.sync_dir}" if chosen == "offline" else
                 f": {self.run.url}" if chosen != "disabled" else "")
        print(f"wandb ({chosen}) run directory: {self.run.settings.sync_dir}{where}", flush=True)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    """Scalars in ``<run_dir>/tensorboard``; a resumed run writes to the same directory and drops
    events an earlier process logged after its resume point (``purge_step``)."""

    def __init__(self, run_dir: Path, first_iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=first_iteration if first_iteration > 1 else None)
        print(f"tensorboard event directory: {self.dir} (tensorboard --logdir {self.dir})", flush=True)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True, kw_only=True)
class LoggerSpec:
    """A metric backend ``trainer.loggers`` may name: the package it needs and how it opens."""

    package: str = ""  # imported to check that it is installed; '' = nothing to install
    install_hint: str = ""
    #: (trainer, run_dir, resolved config, first iteration) -> logger; None: nothing to open (metrics.jsonl)
    open: Callable[[TrainerConfig, Path, dict, int], Any] | None = None


LOGGERS: Registry[LoggerSpec] = Registry("logger")
LOGGERS.register("jsonl", LoggerSpec())
LOGGERS.register("wandb", LoggerSpec(
    package="wandb", install_hint="pip install wandb",
    open=lambda trainer, run_dir, config, first: WandbLogger(trainer, run_dir, config)))
LOGGERS.register("tensorboard", LoggerSpec(  # torch.utils.tensorboard needs the tensorboard package
    package="tensorboard", install_hint="pip install tensorboard (or pip install -e .[tensorboard])",
    open=lambda trainer, run_dir, config, first: TensorBoardLogger(run_dir, first)))


def check_loggers(loggers: Sequence[str]) -> list[str]:
    """Chosen loggers that are not registered or whose package is missing, each with what to do."""
    problems = []
    for name in dict.fromkeys(loggers):
        if name not in LOGGERS:
            problems.append(f"trainer.loggers: {LOGGERS.unknown_message(name)}")
            continue
        spec = LOGGERS.get(name)
        if not spec.package:
            continue
        try:
            importlib.import_module(spec.package)
        except ImportError:
            problems.append(f"trainer.loggers has {name}, which is not installed: {spec.install_hint}")
    return problems


def open_loggers(trainer: TrainerConfig, run_dir: Path, config: dict, first_iteration: int) -> list:
    """The backends ``trainer.loggers`` names besides the JSONL file."""
    problems = check_loggers(trainer.loggers)
    if problems:
        raise ConfigError("; ".join(problems))
    specs = [LOGGERS.get(name) for name in dict.fromkeys(trainer.loggers)]
    return [spec.open(trainer, run_dir, config, first_iteration) for spec in specs if spec.open]


class RunLog:
    def __init__(self, run_dir: Path, *, active: bool, trainer: TrainerConfig | None = None,
                 config: dict | None = None, first_iteration: int = 1) -> None:
        self.run_dir, self.active = Path(run_dir), active
        self.path = self.run_dir / "metrics.jsonl"
        self._loggers: list = []
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if trainer is not None:
            self._loggers = open_loggers(trainer, self.run_dir, config or {}, first_iteration)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        values = scalars(record)
        for logger in self._loggers:
            logger.log(values, step=int(record["iteration"]))

    def close(self, history: Sequence[dict]) -> list[Path]:
        """Write the plots; close the loggers. Returns the PNG paths."""
        if not self.active:
            return []
        paths = write_plots(history, self.run_dir)
        for logger in self._loggers:
            logger.close()
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


def describe(key: str) -> tuple[str, str]:
    """(title, y label) for one metric key, from the plot that shows it (else its legend name)."""
    for spec in PLOTS:
        if key in spec.keys or (spec.pattern and re.match(spec.pattern, key)):
            alone = len(spec.keys) == 1 and not spec.pattern
            return (spec.title if alone else f"{spec.title}: {label(key)}"), spec.ylabel
    return label(key), ""


def phases(history: Sequence[dict]) -> list[tuple[float, float, bool]]:
    """(start, end, off-policy) spans in rollouts: Mix iterations replay (p > 0), on-policy ones do not."""
    spans: list[tuple[float, float, bool]] = []
    previous = 0.0
    for record in history:
        if "off_policy_portion" not in record:
            continue
        x, mix = record.get("rollouts_total", 0), record["off_policy_portion"] > 0
        if spans and spans[-1][2] == mix:
            spans[-1] = (spans[-1][0], x, mix)
        else:
            spans.append((previous, x, mix))
        previous = x
    return spans


def reincarnation_point(history: Sequence[dict]) -> tuple[int, float] | None:
    """(T, rollouts at the end of step T) of the first reincarnated iteration, if the run reached it."""
    before = None
    for record in history:
        if record.get("reincarnated"):
            return record["iteration"] - 1, (before or {}).get("rollouts_total", 0)
        if "reincarnated" in record:
            before = record
    return None


def mark_phases(axis, history: Sequence[dict], *, shade: bool = True, color: str = "black", name: str = "") -> None:
    """Shade the Mix and on-policy phases and mark the reincarnation step."""
    if shade:
        for start, end, mix in phases(history):
            axis.axvspan(start, end, color="tab:orange" if mix else "tab:green", alpha=0.08, lw=0)
    point = reincarnation_point(history)
    if point is not None:
        axis.axvline(point[1], color=color, ls="--", lw=1, label=f"{name}reincarnation (T={point[0]})")


def plot_title(spec: PlotSpec, found: list[tuple[str, list]]) -> str:
    """The spec's title, saying so when its metrics are absent or flat zero (not an empty axis unexplained)."""
    if not found:
        return f"{spec.title}\n(not logged in this run)"
    if all(value == 0 for _, points in found for _, value in points):
        return f"{spec.title}\n(flat zero in this run)"
    return spec.title


def draw(spec: PlotSpec, histories: dict[str, Sequence[dict]], path: Path) -> Path | None:
    """One plot of ``spec`` with a line per run and metric; None for an optional plot without data."""
    plt = pyplot()
    keys = spec.metrics(histories.values())
    lines = [(run, key, curve(history, key)) for run, history in histories.items() for key in keys]
    lines = [line for line in lines if line[2]]
    if not lines and spec.optional:
        return None
    figure, axis = plt.subplots(figsize=(8, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    single = len(histories) == 1
    for index, (run, history) in enumerate(histories.items()):
        run_color = colors[index % len(colors)]
        mark_phases(axis, history, shade=single, color="black" if single else run_color,
                    name="" if single else f"{run}: ")
        run_lines = [(key, points) for name, key, points in lines if name == run]
        for line_index, (key, points) in enumerate(run_lines):
            style = dict(marker="o" if len(points) < 30 else None, markersize=3)
            if single:
                axis.plot(*zip(*points), label=label(key), color=colors[line_index % len(colors)], **style)
            else:
                axis.plot(*zip(*points), color=run_color, ls=("-", "--", ":", "-.")[line_index % 4], **style,
                          label=run if len(run_lines) == 1 else f"{run}: {label(key)}")
    against_rollouts(axis, plot_title(spec, [(key, points) for _, key, points in lines]), ylabel=spec.ylabel,
                     legend=bool(axis.get_legend_handles_labels()[0]))
    if single and phases(next(iter(histories.values()))):
        axis.text(0.01, 0.99, "shaded: Mix (orange), on-policy (green)", transform=axis.transAxes, fontsize=8,
                  va="top", alpha=0.7)
    return save_figure(figure, path, dpi=110)


def write_plots(history: Sequence[dict], out_dir: Path) -> list[Path]:
    """Every plot of one run into ``out_dir``; returns the PNG paths."""
    return overlay_plots({"": history}, out_dir)


def overlay_plots(histories: dict[str, Sequence[dict]], out_dir: Path) -> list[Path]:
    """Every plot with one line per run (legend: the run names); returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [draw(spec, histories, out_dir / spec.file) for spec in PLOTS]
    benchmarks = PlotSpec("benchmarks.png", "benchmark scores (pass@1 / avg@k)", "score", optional=True,
                          pattern=r"eval/[^/]+$")
    paths.append(draw(benchmarks, histories, out_dir / benchmarks.file))
    return [path for path in paths if path is not None]


def read_history(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a line still being written by a running run is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a running run, half written
    return records


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Short legend names: the run directories' paths without the part they share."""
    parts = [Path(run).resolve().parts for run in run_dirs]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]
