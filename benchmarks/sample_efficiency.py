"""Sample efficiency on the tiny arithmetic task: rollouts needed to reach a held-out accuracy.

Runs, one after another as separate `remix-megatron train` processes (TP1, 2 cores):
- ReMix-PPO (configs/tiny_remix_ppo.yaml) vs PPO (configs/tiny_ppo.yaml),
- ReMix-GRPO (configs/tiny_remix_grpo.yaml) vs GRPO (configs/tiny_grpo.yaml),
- two controls on the ReMix-PPO config that must stay flat: no update (losses computed,
  no optimizer step) and shuffled rewards (each step's rewards permuted across its rollouts),
each for every seed, with the same rollout budget (the number of steps is chosen from the
paper's cost formula so that every run generates about ``--budget`` rollouts). Held-out greedy
accuracy on all 512 held-out problems is measured every ``--eval-every`` steps. Nothing is
tuned for the benchmark: the configs are the shipped ones (the paper's defaults for p, N, UTD,
KL-convex; the schedule scaled to the tiny run, see the configs' headers).

Prints, per algorithm, the accuracy at the start and end, the best, the mean over the budget
(area under the accuracy-vs-rollouts curve divided by its span), the rollouts needed to first reach
``--target`` (mean over seeds; a run that never reaches it counts as "> budget"), the ratios
PPO / ReMix-PPO and GRPO / ReMix-GRPO, and writes accuracy-vs-rollouts curves to
``--out``/sample_efficiency.png plus the raw numbers to ``--out``/sample_efficiency.json.

    .venv/bin/python benchmarks/sample_efficiency.py [--seeds 0,1,2] [--budget 7680] [--target 0.35]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {  # name -> (config, overrides)
    "remix_ppo": ("configs/tiny_remix_ppo.yaml", []),
    "ppo": ("configs/tiny_ppo.yaml", []),
    "remix_grpo": ("configs/tiny_remix_grpo.yaml", []),
    "grpo": ("configs/tiny_grpo.yaml", []),
    "control_no_update": ("configs/tiny_remix_ppo.yaml", ["trainer.control=no_update"]),
    "control_shuffled_rewards": ("configs/tiny_remix_ppo.yaml", ["trainer.control=shuffled_rewards"]),
    # Ablations, run only when named in --runs: ReMix with PPO's clip window (centred at 1, ratio
    # still against the behaviour policy) in place of Mix-PPG's window centred at pi_k / b.
    "remix_ppo_ppo_clip": ("configs/tiny_remix_ppo.yaml", ["algorithm.policy_loss=ppo"]),
    "remix_grpo_ppo_clip": ("configs/tiny_remix_grpo.yaml", ["algorithm.policy_loss=ppo"]),
}
DEFAULT_RUNS = ("remix_ppo", "ppo", "remix_grpo", "grpo", "control_no_update", "control_shuffled_rewards")
PAIRS = (("ppo", "remix_ppo"), ("grpo", "remix_grpo"), ("ppo", "remix_ppo_ppo_clip"), ("grpo", "remix_grpo_ppo_clip"))


def steps_for_budget(config: str, budget: int) -> int:
    """The fewest steps whose rollouts (the paper's cost formula) reach ``budget``."""
    sys.path.insert(0, str(REPO))
    from remix_megatron.algorithms import rollout_cost
    from remix_megatron.config import load_config

    cfg = load_config(REPO / config)
    steps = 1
    while rollout_cost(steps, cfg.algorithm, prompts_per_step=cfg.rollout.prompts_per_step,
                       responses_per_prompt=cfg.rollout.responses_per_prompt) < budget:
        steps += 1
    return steps


def run(name: str, seed: int, budget: int, eval_every: int, tiny: Path, out: Path) -> list[dict]:
    config, extra = RUNS[name]
    run_dir = out / f"{name}_seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    steps = steps_for_budget(config, budget)
    if metrics.is_file() and any(json.loads(line)["iteration"] == steps for line in metrics.read_text().splitlines()):
        print(f"{name} seed {seed}: reusing {metrics}", flush=True)
    else:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "remix_megatron.cli", "train", config, f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl",
               f"data.eval_path={tiny}/heldout.jsonl", f"trainer.num_steps={steps}", f"trainer.seed={seed}",
               f"data.eval_interval={eval_every}", "data.eval_size=0", "trainer.save_interval=-1",
               f"trainer.run_dir={run_dir}", *extra]
        start = time.perf_counter()
        print(f"{name} seed {seed}: {steps} steps ...", flush=True)
        result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
                                text=True)
        if result.returncode:
            raise SystemExit(f"{name} seed {seed} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        print(f"{name} seed {seed}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def mean_accuracy(points: list[tuple[int, float]]) -> float:
    """Accuracy averaged over the rollouts generated (trapezoid area under the curve / span): one
    number per run that uses every evaluation, less noisy than the first crossing of a target."""
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return points[-1][1]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / span


def rollouts_to(points: list[tuple[int, float]], target: float) -> int | None:
    """Rollouts at the first evaluation at or above ``target`` (None: never)."""
    return next((rollouts for rollouts, accuracy in points if accuracy >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (several for a mean)")
    parser.add_argument("--budget", type=int, default=7680, help="rollouts per run (PPO: 120 steps of 64)")
    parser.add_argument("--target", type=float, default=0.35, help="held-out accuracy to reach")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help=f"which runs (default: all but the ablation; any of {', '.join(RUNS)})")
    parser.add_argument("--out", default="runs/sample_efficiency", help="run directories, plot and JSON")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.metrics_log import curve

    tiny, out = build_tiny_model(), (REPO / args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    curves = {name: {seed: curve(run(name, seed, args.budget, args.eval_every, tiny, out), "eval_accuracy")
                     for seed in seeds}
              for name in names}

    print(f"\nbudget ~{args.budget} rollouts per run, target held-out accuracy {args.target:.2f}, seeds {seeds}")
    print(f"{'run':26s} {'start':>6s} {'end':>6s} {'best':>6s} {'mean':>6s} {'rollouts to target (per seed)':>32s}")
    summary = {}
    for name in names:
        runs = curves[name]
        starts = [points[0][1] for points in runs.values()]
        ends = [points[-1][1] for points in runs.values()]
        bests = [max(a for _, a in points) for points in runs.values()]
        reached = [rollouts_to(points, args.target) for points in runs.values()]
        means = [mean_accuracy(points) for points in runs.values()]
        summary[name] = {"start": starts, "end": ends, "best": bests, "mean": means, "rollouts_to_target": reached,
                         "curves": {str(seed): points for seed, points in runs.items()}}
        shown = ", ".join(str(r) if r is not None else f">{runs[s][-1][0]}" for r, s in zip(reached, runs))
        print(f"{name:26s} {sum(starts) / len(starts):6.3f} {sum(ends) / len(ends):6.3f} "
              f"{sum(bests) / len(bests):6.3f} {sum(means) / len(means):6.3f} {shown:>32s}")
    for baseline, remix in PAIRS:
        if baseline not in summary or remix not in summary:
            continue
        a, b = summary[baseline]["mean"], summary[remix]["mean"]
        print(f"{remix} - {baseline}: mean accuracy over the budget {sum(b) / len(b) - sum(a) / len(a):+.3f} "
              f"(per seed {', '.join(f'{y - x:+.3f}' for x, y in zip(a, b))})")
        a, b = summary[baseline]["rollouts_to_target"], summary[remix]["rollouts_to_target"]
        if all(x is not None for x in a + b):
            ratio = (sum(a) / len(a)) / (sum(b) / len(b))
            print(f"{baseline} / {remix}: {ratio:.2f}x the rollouts to reach {args.target:.2f} (paper, 1.5B PPO: >10x)")
        elif all(x is not None for x in b):
            print(f"{baseline} / {remix}: > {args.budget / (sum(b) / len(b)):.2f}x ({baseline} never reached "
                  f"{args.target:.2f} within the budget in {sum(x is None for x in a)} of {len(a)} runs)")
        else:
            print(f"{baseline} / {remix}: {remix} did not reach {args.target:.2f} in every run: no ratio")
    for control in ("control_no_update", "control_shuffled_rewards"):
        if control in summary:
            rise = max(summary[control]["best"][i] - summary[control]["start"][i] for i in range(len(seeds)))
            print(f"{control}: largest rise over start {rise:+.3f} (must stay flat)")
    (out / "sample_efficiency.json").write_text(json.dumps({"budget": args.budget, "target": args.target,
                                                           "seeds": seeds, "runs": summary}, indent=1))
    _plot(curves, args.target, out / "sample_efficiency.png")
    print(f"plot: {out / 'sample_efficiency.png'}\nnumbers: {out / 'sample_efficiency.json'}")


def _plot(curves: dict, target: float, path: Path) -> None:
    from remix_megatron.metrics_log import against_rollouts, pyplot, save_figure

    figure, axis = pyplot().subplots(figsize=(6.5, 4))
    for index, (name, runs) in enumerate(curves.items()):
        for n, (seed, points) in enumerate(runs.items()):
            axis.plot(*zip(*points), color=f"C{index}", alpha=0.9, linestyle="--" if "control" in name else "-",
                      label=name if n == 0 else None)
    axis.axhline(target, color="grey", linewidth=0.8)
    against_rollouts(axis, "tiny arithmetic task: accuracy vs rollouts", ylabel="held-out greedy accuracy",
                     legend=True)
    save_figure(figure, path, dpi=110)


if __name__ == "__main__":
    main()
