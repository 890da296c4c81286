"""Sample efficiency on the tiny arithmetic task: accuracy per rollout, with the controls that isolate replay.

Runs, as separate `remix-megatron train` processes (TP1, ``--jobs`` at a time on the 2 cores):
- PPO (configs/tiny_ppo.yaml), ReMix-PPO (configs/tiny_remix_ppo.yaml), GRPO, ReMix-GRPO;
- no-replay controls (``no_replay_ppo``, ``no_replay_grpo``): ReMix's config with p = 0, the same
  fresh rollouts per step (48) and about the same optimizer steps per rollout (UTD 3 over 48 rows in
  minibatches of 16 = 9 steps per 48 rollouts, ReMix's 10); the same schedule, KL-convex and
  reincarnation. ReMix minus this control is what replaying old data adds;
- ``remix_ppo_utd1``: ReMix-PPO at UTD 1;
- two flat controls on the ReMix-PPO config: no update (losses computed, no optimizer step) and
  shuffled rewards (each step's rewards permuted across its rollouts);
each for every seed. PPO, ReMix-PPO, its no-replay control, GRPO and ReMix-GRPO run at every actor lr
of ``--lrs`` (the same grid for each); the GRPO no-replay control, UTD-1 ReMix-PPO and the flat
controls run at their ReMix config's lr (the sweep's choice), to fit the 2 cores. Every run gets the
same rollout budget (the
steps come from the paper's cost formula) and is evaluated on all 512 held-out problems at the same
rollout counts, every ``--eval-every`` rollouts (``data.eval_every_rollouts``), whatever the algorithm.

Reports per run, lr and seed: the mean accuracy over the budget (area under accuracy vs rollouts
divided by its span), the rollouts to each of ``--targets`` and the final accuracy; per pair, each
at its own best lr (highest mean accuracy averaged over seeds): the per-seed differences with their
mean and standard deviation, and the ratio of mean rollouts to each target; the same differences
with each seed's lr chosen on the other seeds only (the best lr is otherwise chosen on the seeds it
is reported on); each run's wall and CPU seconds (benchmark_time.json in its directory). Writes the tables to
``--out``/sample_efficiency.md, the numbers to sample_efficiency.json and an overlay plot (every
seed of every run at its best lr, reincarnation marked) to sample_efficiency.png. Finished runs
(a metrics.jsonl that reached the last step) are reused.

    .venv/bin/python benchmarks/sample_efficiency.py [--seeds 0,1,2] [--lrs 2.5e-5,5e-5,1e-4,2e-4] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NO_REPLAY = ["algorithm.off_policy_portion=0", "algorithm.utd=3"]
RUNS = {  # name -> (config, overrides, swept over --lrs); in the order they run
    "ppo": ("configs/tiny_ppo.yaml", [], True),
    "remix_ppo": ("configs/tiny_remix_ppo.yaml", [], True),
    "no_replay_ppo": ("configs/tiny_remix_ppo.yaml", [*NO_REPLAY, "rollout.prompts_per_step=48"], True),
    "grpo": ("configs/tiny_grpo.yaml", [], True),
    "remix_grpo": ("configs/tiny_remix_grpo.yaml", [], True),
    "no_replay_grpo": ("configs/tiny_remix_grpo.yaml", [*NO_REPLAY, "rollout.prompts_per_step=6"], True),
    "control_no_update": ("configs/tiny_remix_ppo.yaml", ["trainer.control=no_update"], False),
    "control_shuffled_rewards": ("configs/tiny_remix_ppo.yaml", ["trainer.control=shuffled_rewards"], False),
    "remix_ppo_utd1": ("configs/tiny_remix_ppo.yaml", ["algorithm.utd=1"], False),
    # Opt-in: ReMix-PPO with the adaptive lr of algorithm.drift_control, from the grid's top lr (its ceiling)
    # instead of a sweep.
    "remix_ppo_drift_control": ("configs/tiny_remix_ppo.yaml", ["algorithm.drift_control=true",
                                                                "actor_optimizer.lr=2e-4"], False),
}
DEFAULT_RUNS = tuple(name for name in RUNS if name != "remix_ppo_drift_control")
PAIRS = (  # (baseline, compared): compared - baseline
    ("ppo", "remix_ppo"), ("no_replay_ppo", "remix_ppo"), ("ppo", "no_replay_ppo"), ("remix_ppo_utd1", "remix_ppo"),
    ("remix_ppo", "remix_ppo_drift_control"),
    ("grpo", "remix_grpo"), ("no_replay_grpo", "remix_grpo"), ("grpo", "no_replay_grpo"),
)
DRIFT_KEYS = ("drift/kl_prev_fresh", "drift/tv_prev_fresh", "drift/abs_w_minus_1/age1", "drift/outside_window/age1",
              "drift/malformed_rate", "actor/clip_frac")


def load(name: str, lr: float | None = None):
    """The resolved config of run ``name`` (at actor lr ``lr``, else the config's)."""
    sys.path.insert(0, str(REPO))
    from remix_megatron.config import load_config

    config, extra, _ = RUNS[name]
    return load_config(REPO / config, [*extra, *([f"actor_optimizer.lr={lr}"] if lr else [])])


def steps_for_budget(cfg, budget: int) -> int:
    """The fewest steps whose rollouts (the paper's cost formula) reach ``budget``."""
    from remix_megatron.algorithms import rollout_cost

    steps = 1
    while rollout_cost(steps, cfg.algorithm, prompts_per_step=cfg.rollout.prompts_per_step,
                       responses_per_prompt=cfg.rollout.responses_per_prompt) < budget:
        steps += 1
    return steps


def evaluation_rollouts(cfg, num_steps: int, every: int) -> list[int]:
    """Rollouts generated at each evaluation the trainer makes (before the first step too)."""
    from remix_megatron.algorithms import evaluation_due, rollout_cost

    def total(step: int) -> int:
        return rollout_cost(step, cfg.algorithm, prompts_per_step=cfg.rollout.prompts_per_step,
                            responses_per_prompt=cfg.rollout.responses_per_prompt) if step else 0

    return [0] + [total(k) for k in range(1, num_steps + 1)
                  if evaluation_due(k, num_steps, total(k - 1), total(k), every_steps=0, every_rollouts=every)]


def run_one(name: str, lr: float | None, seed: int, budget: int, every: int, tiny: Path, out: Path,
            threads: int) -> tuple[int, Path]:
    """Train one run (unless its metrics.jsonl already reached the last step); returns (steps, metrics path)."""
    config, extra, _ = RUNS[name]
    run_dir = out / (f"{name}_lr{lr:g}_seed{seed}" if lr else f"{name}_seed{seed}")
    metrics = run_dir / "metrics.jsonl"
    steps = steps_for_budget(load(name, lr), budget)
    if metrics.is_file() and any(json.loads(line)["iteration"] == steps for line in metrics.read_text().splitlines()):
        return steps, metrics
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "remix_megatron.cli", "train", config, f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
           f"data.eval_path={tiny}/heldout.jsonl", f"trainer.num_steps={steps}", f"trainer.seed={seed}",
           "data.eval_interval=0", f"data.eval_every_rollouts={every}", "data.eval_size=0", "trainer.save_interval=-1",
           "trainer.log_unused_kl=true",  # every run logs KL to the precedent (drift), whatever its loss uses
           f"trainer.run_dir={run_dir}", *extra, *([f"actor_optimizer.lr={lr}"] if lr else [])]
    log = out / f"{run_dir.name}.log"
    start = time.perf_counter()
    with log.open("w") as stream:
        process = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                   stdout=stream, stderr=subprocess.STDOUT)
        # wait4, not wait: the CPU time of torchrun and its worker, which is the run's cost on a quiet core
        # (at one thread) whatever else shares the machine
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{run_dir.name} failed:\n{log.read_text()[-6000:]}")
    wall, cpu = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
    (run_dir / "benchmark_time.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "threads": threads}))
    print(f"{run_dir.name}: {steps} steps in {wall:.0f} s ({cpu:.0f} s CPU)", flush=True)
    return steps, metrics


def run_times(paths: list[Path]) -> dict | None:
    """Wall and CPU seconds of the runs whose directories hold a benchmark_time.json (None: none do)."""
    times = [json.loads(f.read_text()) for f in (p.parent / "benchmark_time.json" for p in paths) if f.is_file()]
    if not times:
        return None
    return {"runs_timed": len(times), "runs": len(paths), "wall_s": sum(t["wall_s"] for t in times),
            "cpu_s": sum(t["cpu_s"] for t in times)}


def accuracy_curve(metrics: Path, expected: list[int]) -> list[tuple[int, float]]:
    """(rollouts, held-out accuracy) of a run, checked to be evaluated exactly at ``expected`` rollouts."""
    points = [(r["rollouts_total"], r["eval_accuracy"]) for r in map(json.loads, metrics.read_text().splitlines())
              if "eval_accuracy" in r]
    if [x for x, _ in points] != expected:
        raise ValueError(f"{metrics}: evaluated at rollouts {[x for x, _ in points]}, not the matched {expected}")
    return points


def mean_accuracy(points: list[tuple[int, float]]) -> float:
    """Accuracy averaged over the rollouts generated: trapezoid area under the curve / its span."""
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return points[-1][1]
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:])) / span


def rollouts_to(points: list[tuple[int, float]], target: float) -> int | None:
    """Rollouts at the first evaluation at or above ``target`` (None: never)."""
    return next((rollouts for rollouts, accuracy in points if accuracy >= target), None)


def drift_summary(metrics: Path, up_to_rollouts: int) -> dict[str, float]:
    """Mean of each drift metric over the iterations that end at or before ``up_to_rollouts``."""
    records = [r for r in map(json.loads, metrics.read_text().splitlines())
               if r["iteration"] > 0 and r["rollouts_total"] <= up_to_rollouts]
    return {key: statistics.fmean(r[key] for r in records if key in r) for key in DRIFT_KEYS
            if any(key in r for r in records)}


def run_summary(points: list[tuple[int, float]], targets: list[float]) -> dict:
    """One run's row: mean accuracy over the budget, rollouts to each target, start and final accuracy."""
    return {"mean": mean_accuracy(points), "final": points[-1][1], "start": points[0][1],
            "rollouts_to": {f"{t:g}": rollouts_to(points, t) for t in targets}}


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def best_lr(by_lr: dict, seeds: list[str] | None = None) -> str:
    """The lr whose mean accuracy over the budget, averaged over ``seeds`` (default: all), is highest."""
    return max(by_lr, key=lambda lr: statistics.fmean(row["mean"] for seed, row in by_lr[lr].items()
                                                      if seeds is None or seed in seeds))


def held_out_rows(by_lr: dict) -> tuple[dict, dict]:
    """Each seed's row at the lr chosen on the other seeds (selection and report never share a seed);
    returns (rows by seed, chosen lr by seed)."""
    seeds = sorted(set.intersection(*(set(rows) for rows in by_lr.values())), key=int)
    lrs = {seed: best_lr(by_lr, [s for s in seeds if s != seed]) for seed in seeds}
    return {seed: by_lr[lr][seed] for seed, lr in lrs.items()}, lrs


def compare(baseline: dict, other: dict, targets: list[float], budget: int) -> dict:
    """``other`` - ``baseline`` per seed (same seeds), and baseline / other mean rollouts to each target
    (a run that never reaches a target counts as the budget, and the ratio is then marked as a bound)."""
    seeds = sorted(set(baseline) & set(other), key=int)
    out = {"seeds": seeds}
    for key in ("mean", "final"):
        diffs = [other[s][key] - baseline[s][key] for s in seeds]
        out[f"{key}_diff"] = {"per_seed": diffs, **spread(diffs)}
    out["rollouts_ratio"] = {}
    for t in map(lambda t: f"{t:g}", targets):
        a, b = ([run[s]["rollouts_to"][t] for s in seeds] for run in (baseline, other))
        if all(x is None for x in b):
            out["rollouts_ratio"][t] = None
            continue
        ratio = statistics.fmean(x if x is not None else budget for x in a) / statistics.fmean(
            x if x is not None else budget for x in b)
        out["rollouts_ratio"][t] = {"ratio": ratio, "bound": any(x is None for x in a + b)}
    return out


def _fmt_rollouts(values: list[int | None]) -> str:
    return ", ".join("never" if v is None else f"{v:,}" for v in values)


def markdown(summary: dict, targets: list[float], budget: int) -> str:
    """The per-run table (every lr and seed) and the per-pair table (each at its best lr)."""
    lines = [f"Budget {budget:,} rollouts per run; mean = accuracy averaged over the budget; per-seed values "
             "are listed in seed order.", "",
             "| run | lr | start | mean (per seed) | final (per seed) | "
             + " | ".join(f"rollouts to {t:g}" for t in targets) + " |",
             "|---|---|---|---|---|" + "---|" * len(targets)]
    for name, entry in summary["runs"].items():
        for lr, seeds in entry["by_lr"].items():
            rows = [seeds[s] for s in sorted(seeds, key=int)]
            best = " (best)" if lr == entry["best_lr"] and len(entry["by_lr"]) > 1 else ""
            cells = [f"{statistics.fmean(r[key] for r in rows):.3f} ({', '.join(f'{r[key]:.3f}' for r in rows)})"
                     for key in ("mean", "final")]
            lines.append(f"| {name} | {lr}{best} | {statistics.fmean(r['start'] for r in rows):.3f} | "
                         + " | ".join(cells) + " | "
                         + " | ".join(_fmt_rollouts([r["rollouts_to"][f"{t:g}"] for r in rows]) for t in targets)
                         + " |")
    lines += ["", "Pairs: A - B is A minus B per seed; the rollouts ratio is B's mean rollouts to the target over A's "
              "(> 1: A needs fewer; ~: a run that never reached it counts as the budget).", "",
              "| pair (each at its best lr) | mean-accuracy difference, mean ± std (per seed) | final difference | "
              + " | ".join(f"rollouts ratio to {t:g}" for t in targets) + " |",
              "|---|---|---|" + "---|" * len(targets)]
    for key, pair in summary["pairs"].items():
        m, f = pair["mean_diff"], pair["final_diff"]
        ratios = []
        for t in targets:
            r = pair["rollouts_ratio"][f"{t:g}"]
            ratios.append("not reached" if r is None else f"{'~' if r['bound'] else ''}{r['ratio']:.2f}x")
        lines.append(f"| {key} | {m['mean']:+.3f} ± {m['std']:.3f} ({', '.join(f'{d:+.3f}' for d in m['per_seed'])}) "
                     f"| {f['mean']:+.3f} ± {f['std']:.3f} | " + " | ".join(ratios) + " |")
    if "held_out" in summary:
        lrs = summary["held_out"]["lrs"]
        lines += ["", "The same pairs with each seed's lr chosen on the other seeds only (selection and report never "
                  "share a seed; an unswept run keeps its one lr):", "",
                  "| pair | mean-accuracy difference, mean ± std (per seed) | lr per seed (A; B) |", "|---|---|---|"]
        for key, pair in summary["held_out"]["pairs"].items():
            m, (other, baseline) = pair["mean_diff"], key.split(" - ")
            chosen = "; ".join(", ".join(lrs[name][s] for s in pair["seeds"]) for name in (other, baseline))
            lines.append(f"| {key} | {m['mean']:+.3f} ± {m['std']:.3f} "
                         f"({', '.join(f'{d:+.3f}' for d in m['per_seed'])}) | {chosen} |")
    lines += ["", "Drift over the first half of the budget (ReMix's Mix phase; means over iterations and seeds, "
              "best lr):", "",
              "| run | " + " | ".join(k.split("/", 1)[1] for k in DRIFT_KEYS) + " |",
              "|---|" + "---|" * len(DRIFT_KEYS)]
    for name, entry in summary["runs"].items():
        drift = entry.get("drift", {})
        lines.append(f"| {name} | " + " | ".join(f"{drift[k]:.4f}" if k in drift else "-" for k in DRIFT_KEYS) + " |")
    if summary.get("time"):
        t = summary["time"]
        lines += ["", f"Run time: {t['runs_timed']} of the {t['runs']} runs were timed (the rest were reused), "
                  f"{t['wall_s'] / 60:.1f} min wall and {t['cpu_s'] / 60:.1f} min CPU in all."]
    return "\n".join(lines) + "\n"


def summarize(results: dict, targets: list[float], budget: int) -> dict:
    """``results[name][lr][seed] = (points, metrics path)`` -> per-run rows, best lrs and pairs."""
    runs = {}
    for name, by_lr in results.items():
        rows = {lr: {seed: run_summary(points, targets) for seed, (points, _) in seeds.items()}
                for lr, seeds in by_lr.items()}
        best = best_lr(rows)
        drifts = [drift_summary(path, budget // 2) for _, path in results[name][best].values()]
        shared = [k for k in drifts[0] if all(k in d for d in drifts)]
        drift = {k: statistics.fmean(d[k] for d in drifts) for k in shared}
        runs[name] = {"by_lr": rows, "best_lr": best, "drift": drift}
    pairs = {f"{other} - {baseline}": compare(runs[baseline]["by_lr"][runs[baseline]["best_lr"]],
                                              runs[other]["by_lr"][runs[other]["best_lr"]], targets, budget)
             for baseline, other in PAIRS if baseline in runs and other in runs}
    summary = {"budget": budget, "targets": targets, "runs": runs, "pairs": pairs}
    if all(len(rows) > 1 for entry in runs.values() for rows in entry["by_lr"].values()):
        held_out = {name: held_out_rows(entry["by_lr"]) for name, entry in runs.items()}
        summary["held_out"] = {
            "lrs": {name: lrs for name, (_, lrs) in held_out.items()},
            "pairs": {f"{other} - {baseline}": compare(held_out[baseline][0], held_out[other][0], targets, budget)
                      for baseline, other in PAIRS if baseline in runs and other in runs}}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--lrs", default="2.5e-5,5e-5,1e-4,2e-4", help="actor lr grid, the same for every swept run")
    parser.add_argument("--budget", type=int, default=1920, help="rollouts per run")
    parser.add_argument("--eval-every", type=int, default=240, help="rollouts between held-out evaluations")
    parser.add_argument("--targets", default="0.35,0.45", help="held-out accuracies to reach, comma-separated")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"which runs (any of {', '.join(RUNS)})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets 2 // jobs threads, at least 1)")
    parser.add_argument("--out", default="runs/sample_efficiency", help="run directories, tables, plot")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    seeds, lrs = [int(s) for s in args.seeds.split(",")], [float(x) for x in args.lrs.split(",")]
    targets = [float(t) for t in args.targets.split(",")]

    sys.path.insert(0, str(REPO))
    from remix_megatron.data.tiny import build_tiny_model

    tiny, out = build_tiny_model(), REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, lr, seed) for name in names for lr in (lrs if RUNS[name][2] else [None]) for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda job: run_one(*job, args.budget, args.eval_every, tiny, out,
                                                 max(1, 2 // args.jobs)), jobs))
    results: dict = {}
    for (name, lr, seed), (steps, path) in zip(jobs, done):
        expected = evaluation_rollouts(load(name, lr), steps, args.eval_every)
        results.setdefault(name, {}).setdefault(f"{lr or load(name).actor_optimizer.lr:g}", {})[str(seed)] = (
            accuracy_curve(path, expected), path)
    summary = summarize(results, targets, args.budget)
    summary["time"] = run_times([path for _, path in done])
    table = markdown(summary, targets, args.budget)
    print("\n" + table)
    (out / "sample_efficiency.md").write_text(table)
    (out / "sample_efficiency.json").write_text(json.dumps(summary, indent=1))
    _plot(results, summary, out / "sample_efficiency.png")
    print(f"tables: {out / 'sample_efficiency.md'}\nnumbers: {out / 'sample_efficiency.json'}\n"
          f"plot: {out / 'sample_efficiency.png'}")


def _reincarnation_rollouts(metrics: Path) -> int | None:
    """Rollouts generated before the first reincarnated iteration (None: never)."""
    for record in map(json.loads, metrics.read_text().splitlines()):
        if record.get("reincarnated"):
            return record["rollouts_total"] - record["rollouts"]
    return None


def _plot(results: dict, summary: dict, path: Path) -> None:
    from remix_megatron.metrics_log import against_rollouts, pyplot, save_figure

    families = [("PPO", [n for n in results if "grpo" not in n]), ("GRPO", [n for n in results if "grpo" in n])]
    families = [(title, members) for title, members in families if members]
    figure, axes = pyplot().subplots(1, len(families), figsize=(6.5 * len(families), 4.2), squeeze=False)
    for axis, (title, members) in zip(axes[0], families):
        for index, name in enumerate(members):
            best = summary["runs"][name]["best_lr"]
            for n, (points, metrics) in enumerate(results[name][best].values()):
                axis.plot(*zip(*points), color=f"C{index}", alpha=0.8, linewidth=1.2,
                          linestyle="--" if "control" in name or "no_replay" in name else "-",
                          label=f"{name} (lr {best})" if n == 0 else None)
                reincarnation = _reincarnation_rollouts(metrics)
                if reincarnation is not None and n == 0:
                    axis.axvline(reincarnation, color=f"C{index}", linewidth=0.8, linestyle=":")
        against_rollouts(axis, f"tiny task, {title} family: accuracy vs rollouts (dotted: reincarnation)",
                         ylabel="held-out greedy accuracy", legend=True)
    save_figure(figure, path, dpi=110)


if __name__ == "__main__":
    main()
