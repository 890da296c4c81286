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
``--precision compare`` times only the update's unit instead: the actor's forward + backward + Adam
step on one minibatch, fp32 and bf16 alternating (``--rounds`` each), and prints the ratio. Run it
with ``OMP_NUM_THREADS=1``, as torchrun runs training: on a shared machine two threads' spinning
swamps the difference.

    .venv/bin/python benchmarks/rl_throughput.py [--config C --prompts 256 --iterations 4 --micro-batch 8
                                                  --precision fp32|bf16|compare --rounds 30]
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
    parser.add_argument("--rounds", type=int, default=30, help="--precision compare: timed steps of each")
    args = parser.parse_args()
    if args.precision == "compare":
        compare_update_steps(args)
        return
    cfg, history = run_iterations(args, args.precision)
    report(args, cfg, history)


def compare_update_steps(args) -> None:
    """Median fwd + bwd + Adam step of the actor on one minibatch of the config's shape, fp32 and bf16
    actors alternating in one process (so drifting machine load hits both alike), and their ratio."""
    import dataclasses
    import statistics

    import torch

    from remix_megatron.algorithms import ActorLossInputs, kl_lambda
    from remix_megatron.algorithms.megatron_adapter import actor_loss_builder, run_pipeline, split_micro_batches
    from remix_megatron.config import load_config
    from remix_megatron.models import build_actor, make_trainable
    from remix_megatron.parallel import destroy_parallel, init_parallel

    cfg = load_config(args.config, [f"trainer.micro_batch_size={args.micro_batch}"] if args.micro_batch else [])
    state = init_parallel(cfg)
    states = {"fp32": state, "bf16": dataclasses.replace(
        state, runtime=dataclasses.replace(state.runtime, autocast_dtype=torch.bfloat16))}
    actors = {name: make_trainable(build_actor(cfg.model, s), cfg.actor_optimizer, cfg.parallel, s)
              for name, s in states.items()}
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.trainer.global_batch_size, cfg.trainer.seq_length)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    stored = -torch.rand(shape, generator=gen) * 2
    inputs = ActorLossInputs(loss_mask=torch.ones(shape), advantages=torch.randn(shape, generator=gen),
                             behaviour_logprobs=stored, pik_logprobs=stored + 0.01, ref_logprobs=stored - 0.01,
                             prev_logprobs=stored, sample_age=torch.arange(shape[0]) % 3)
    batches = split_micro_batches(tokens, torch.roll(tokens, -1, 1), cfg.trainer.micro_batch_size, actor=inputs)
    # CPU seconds of this process beside wall seconds: on a shared machine a step's wall time is
    # mostly waiting for a core, its CPU time is the work done
    seconds = {(name, clock): [] for name in actors for clock in ("wall", "cpu")}
    for rep in range(args.rounds + 3):  # three warm-up rounds
        for name, actor in actors.items():
            builder = actor_loss_builder(cfg.algorithm, states[name], kl_lambda=kl_lambda(1, cfg.algorithm))
            wall, cpu = time.perf_counter(), time.process_time()
            actor.zero_grad()
            run_pipeline(actor.chunks, batches, builder, states[name], forward_only=False)
            actor.step()
            if rep >= 3:
                seconds[name, "wall"].append(time.perf_counter() - wall)
                seconds[name, "cpu"].append(time.process_time() - cpu)
    destroy_parallel()
    print(f"actor fwd + bwd + Adam step, {shape[0]} rows x {shape[1]} tokens in micro-batches of "
          f"{cfg.trainer.micro_batch_size}, median of {args.rounds} ({torch.get_num_threads()} threads):")
    for clock in ("wall", "cpu"):
        fp32, bf16 = seconds["fp32", clock], seconds["bf16", clock]
        paired = statistics.median(f / b for f, b in zip(fp32, bf16))
        print(f"  {clock:4s} ms: fp32 {1e3 * statistics.median(fp32):7.1f}, bf16 {1e3 * statistics.median(bf16):7.1f}"
              f" -> fp32 / bf16 {paired:.2f}x (median of paired rounds)")


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

    from remix_megatron.algorithms import needs_critic
    from remix_megatron.data.tiny import build_tiny_model

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
    models = 2 if needs_critic(cfg.algorithm.advantage_estimator) else 1  # actor (+ critic)
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
