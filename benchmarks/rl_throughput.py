"""RL loop throughput on the tiny task: seconds per 1k rollouts and where a step's time goes.

Runs a few iterations of a tiny config (default ``configs/tiny_remix_ppo.yaml``; ``--config
configs/tiny_ppo.yaml`` for the on-policy baseline) in this process (TP1) with ``--prompts``
rollouts per step, then reports seconds per 1,000 rollouts generated (first iteration excluded
as warm-up) and each phase's share of the step: weight sync, generation (with grading and the
behaviour log-prob / value pass), store write + publish, pi_k/ref/prev log-probs + advantages,
and the UTD updates. Targets (issue 8): <= 4 s per 1k rollouts at ~13-token completions and 256
rollouts per step; <= 5% of a step outside generation, grading and model forward/backward (here:
sync + store).

It also prints a floor for the update phase alone: 6 x parameters x trained tokens x UTD x
(actor + critic) FLOPs at the fp32 matmul rate of this machine (a [768, 128] x [128, 704] mm,
the tiny model's widest layer, measured here), per 1k rollouts generated. No software change
gets the update below that floor in fp32 on these cores.

``--precision bf16`` runs the model passes under CPU bf16 autocast (``parallel.precision=bf16``);
``--precision compare`` runs fp32 and bf16 alternately (``--rounds`` times each) and prints the
bf16 / fp32 ratio of the update and log-prob phases.

    .venv/bin/python benchmarks/rl_throughput.py [--config C --prompts 256 --iterations 4 --micro-batch 8
                                                  --precision fp32|bf16|compare --rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def matmul_gflops(repeats: int = 200) -> float:
    import torch

    a, b = torch.randn(768, 128), torch.randn(128, 704)
    for _ in range(20):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 768 * 128 * 704 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_remix_ppo.yaml")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=None, help="trainer.micro_batch_size (default: config's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "compare"), default="fp32")
    parser.add_argument("--rounds", type=int, default=2, help="--precision compare: runs of each precision")
    args = parser.parse_args()
    if args.precision != "compare":
        cfg, history = run_iterations(args, args.precision)
        report(args, cfg, history)
        return
    phases = ("update", "logprobs")
    seconds = {(precision, phase): [] for precision in ("fp32", "bf16") for phase in phases}
    for _ in range(args.rounds):
        for precision in ("fp32", "bf16"):  # alternating, so drifting machine load hits both alike
            _, history = run_iterations(args, precision)
            rollouts = sum(r["rollouts"] for r in history)
            for phase in phases:
                seconds[precision, phase].append(1000 * sum(r[f"time/{phase}_s"] for r in history) / rollouts)
    for phase in phases:
        fp32, bf16 = seconds["fp32", phase], seconds["bf16", phase]
        print(f"  {phase:9s} s per 1k rollouts: fp32 {' '.join(f'{t:.2f}' for t in fp32)}, "
              f"bf16 {' '.join(f'{t:.2f}' for t in bf16)} -> fp32 / bf16 = {sum(fp32) / sum(bf16):.2f}x")


def run_iterations(args, precision: str):
    """Train ``args.iterations`` steps at ``precision``; the config and the records after the first."""
    from remix_megatron.config import load_config
    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.parallel import destroy_parallel
    from remix_megatron.trainer import train

    tiny = build_tiny_model()
    run = tempfile.mkdtemp(prefix="rl-bench-")
    micro_batch = [f"trainer.micro_batch_size={args.micro_batch}"] if args.micro_batch else []
    cfg = load_config(args.config, [
        f"model.hf_path={tiny}", f"data.train_path={tiny}/train.jsonl", "data.eval_interval=0",
        "data.eval_every_rollouts=0", f"rollout.prompts_per_step={args.prompts}",
        f"trainer.num_steps={args.iterations}", "trainer.save_interval=-1", f"trainer.run_dir={run}",
        f"parallel.precision={precision}", *micro_batch])
    history = [r for r in train(cfg) if r["iteration"] > 1]  # the first iteration has nothing to replay
    destroy_parallel()
    return cfg, history


def report(args, cfg, history: list[dict]) -> None:
    """Seconds per 1k rollouts, phase shares and the update's fp32 FLOP floor."""
    import json

    from remix_megatron.data.tiny import build_tiny_model
    from remix_megatron.planning import CRITIC_ESTIMATORS

    tiny = build_tiny_model()
    total = sum(r["time/iteration_s"] for r in history)
    rollouts = sum(r["rollouts"] for r in history)
    tokens = sum(r["rollouts"] * r["response_length"] for r in history)
    print(f"{args.config}: {len(history)} iterations, {rollouts} rollouts of {tokens / rollouts:.1f} tokens on average")
    print(f"  seconds per 1k rollouts: {1000 * total / rollouts:.1f} (target <= 4 at ~13-token completions)")
    for phase in ("sync", "generate", "store", "logprobs", "update"):
        share = sum(r[f"time/{phase}_s"] for r in history) / total
        print(f"  {phase:9s} {100 * share:5.1f}% of the step")
    outside = sum(r["time/sync_s"] + r["time/store_s"] for r in history) / total
    print(f"  outside generation, grading and forward/backward (sync + store): {100 * outside:.1f}% (target <= 5%)")

    parameters = json.loads((tiny / "BUILD.json").read_text())["parameters"]
    models = 2 if cfg.algorithm.advantage_estimator in CRITIC_ESTIMATORS else 1  # actor (+ critic)
    prompt_tokens = 9  # <|user|>a+b=<|end|><|assistant|>
    rows = cfg.rollout.prompts_per_step * cfg.rollout.responses_per_prompt  # training rows per step
    trained = sum(rows * (prompt_tokens + r["response_length"]) * r["utd"] for r in history)
    flops = 6 * parameters * trained * models
    rate = matmul_gflops()
    update = sum(r["time/update_s"] for r in history)
    print(f"  update: {flops / 1e9:.0f} GFLOP for {rollouts} rollouts at UTD {history[-1]['utd']} x {models} model(s); "
          f"fp32 matmul here {rate:.0f} GFLOP/s -> floor {1000 * flops / 1e9 / rate / rollouts:.1f} s per 1k rollouts "
          f"(measured {1000 * update / rollouts:.1f}, {flops / 1e9 / update:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
