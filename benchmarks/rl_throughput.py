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
(actor + critic) FLOPs at this machine's fp32 (and bf16) rate on the tiny model's widest layer (a
[768, 128] x [704, 128]^T linear, measured here), per 1k rollouts generated. No software change
gets the update below that floor on these cores.

``--precision bf16`` runs the model passes under CPU bf16 autocast (``parallel.precision=bf16``);
it is faster only on a CPU that multiplies bf16 natively (AVX-512 BF16 or AMX; the table's header
says whether this one does). ``--precision compare`` times only the update's unit instead: the
actor's forward + backward + Adam step on one minibatch, fp32 and bf16 alternating (``--rounds``
each), and prints the ratio. Run it with ``OMP_NUM_THREADS=1``, as torchrun runs training: on a
shared machine two threads' spinning swamps the difference.

``--matrix`` runs, one subprocess each, in each of ``--precisions`` (fp32,bf16): GRPO in the peer
library's set-up of issue 24 (``tiny_grpo.yaml``, 32 prompts x 8 responses, one optimizer step and
one forward + backward per batch, no KL term), GRPO as configured (minibatches of 16 rows in
micro-batches of 8, KL 0.001 to the base), PPO and ReMix-PPO (``tiny_ppo.yaml``,
``tiny_remix_ppo.yaml``, 256 prompts, their minibatches of 16) in micro-batches of 8 (the configs')
and of 16 (one per minibatch; the same gradient to float rounding). It prints one table: s per 1k
rollouts, the phases' shares, and the update's floor at fp32 and bf16. Targets on 2 cores: GRPO
<= 3.5 s per 1k (peer parity), ReMix-PPO bf16 <= 8 s per 1k. ``--against REV`` (with
``--matrix`` or one config) also runs REV (a git revision, in a temporary worktree; this file's
code drives both) in fp32, alternating the order each round, ``--rounds`` times, and prints this
tree's time over REV's fp32 time (median of the paired rounds).

    .venv/bin/python benchmarks/rl_throughput.py [--config C --prompts 256 --iterations 4 --micro-batch 8
                                                  --precision fp32|bf16|compare --rounds 30]
    .venv/bin/python benchmarks/rl_throughput.py --matrix [--against HEAD~1 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name, config, prompts per step, overrides: 256 rollouts per step each
MATRIX = (("GRPO peer set-up", "configs/tiny_grpo.yaml", 32,  # one optimizer step and one fwd+bwd per batch, no KL
           ("trainer.global_batch_size=256", "trainer.micro_batch_size=256", "algorithm.kl_coef=0")),
          ("GRPO", "configs/tiny_grpo.yaml", 32, ()),  # the config: minibatches of 16, micro-batches of 8
          ("PPO", "configs/tiny_ppo.yaml", 256, ()),
          ("PPO mb16", "configs/tiny_ppo.yaml", 256, ("trainer.micro_batch_size=16",)),  # a minibatch in one
          ("ReMix-PPO", "configs/tiny_remix_ppo.yaml", 256, ()),
          ("ReMix-PPO mb16", "configs/tiny_remix_ppo.yaml", 256, ("trainer.micro_batch_size=16",)))
PHASES = ("sync", "generate", "store", "logprobs", "update")


def matmul_gflops(repeats: int = 200, dtype=None) -> float:
    """GFLOP/s of the tiny model's widest layer as a linear, ``[768, 128] x [128, 704]``, in ``dtype``."""
    import torch
    import torch.nn.functional as F

    dtype = dtype or torch.float32
    a, w = torch.randn(768, 128, dtype=dtype), torch.randn(704, 128, dtype=dtype)
    for _ in range(20):
        F.linear(a, w)
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(a, w)
    return 2 * 768 * 128 * 704 * repeats / (time.perf_counter() - start) / 1e9


def cpu_bf16() -> str:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 / AMX), from /proc/cpuinfo."""
    from remix_megatron.validation import native_cpu_bf16

    native = native_cpu_bf16()
    if native is None:
        return "unknown"
    return ", ".join(native) if native else "none (bf16 matmuls are emulated: slower than fp32 here)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_remix_ppo.yaml")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=None, help="trainer.micro_batch_size (default: config's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "compare"), default="fp32")
    parser.add_argument("--rounds", type=int, default=None,
                        help="--precision compare: timed steps of each (30); --against: alternating rounds (3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    parser.add_argument("--matrix", action="store_true", help="GRPO, PPO, ReMix-PPO x fp32, bf16 in one table")
    parser.add_argument("--precisions", default="fp32,bf16", help="--matrix: the precisions to run")
    parser.add_argument("--against", default=None, metavar="REV", help="alternating runs against git revision REV")
    args = parser.parse_args()
    if args.precision == "compare":
        args.rounds = args.rounds or 30
        compare_update_steps(args)
        return
    if args.matrix or args.against:
        run_many(args)
        return
    cfg, history = run_iterations(args, args.precision)
    result = report(args, cfg, history)
    if args.json:
        Path(args.json).write_text(json.dumps(result))


def cases(args) -> list[tuple[str, str, int, tuple[str, ...], str]]:
    """(name, config, prompts, overrides, precision) of each run ``--matrix`` or one config asks for."""
    if not args.matrix:
        return [(Path(args.config).stem, args.config, args.prompts, tuple(args.set), args.precision)]
    return [(name, config, prompts, (*overrides, *args.set), precision)
            for name, config, prompts, overrides in MATRIX for precision in args.precisions.split(",")]


def run_case(case, tree: Path, args) -> dict:
    """One case in a subprocess whose ``remix_megatron`` is ``tree``'s; its JSON result."""
    name, config, prompts, overrides, precision = case
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(Path(__file__).resolve()), "--config", str(tree / config), "--prompts",
                   str(prompts), "--iterations", str(args.iterations), "--precision", precision, "--json", out.name,
                   *[f"--set={item}" for item in overrides]]
        if args.micro_batch:
            command += ["--micro-batch", str(args.micro_batch)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} {precision} at {tree} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        result = json.loads(Path(out.name).read_text())
    if Path(result["package"]).resolve().parents[0] != tree.resolve():
        sys.exit(f"{name} ran {result['package']}, not the package of {tree}")
    return result


def run_many(args) -> None:
    """The matrix (or one config) here, and with ``--against`` on REV in alternating order."""
    trees = {"here": ROOT}
    scratch = None
    if args.against:
        scratch = Path(tempfile.mkdtemp(prefix="rl-bench-rev-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(scratch), args.against],
                       check=True, capture_output=True)
        trees[args.against] = scratch
    rounds = (args.rounds or 3) if args.against else 1
    results: dict[tuple, list[dict]] = {}
    try:
        for index in range(rounds):
            order = list(trees.items()) if index % 2 == 0 else list(trees.items())[::-1]
            for case in cases(args):
                for label, tree in order:
                    if label != "here" and case[4] != "fp32":
                        continue  # REV's fp32 is the base for both (an older tree may not run bf16 on CPU)
                    result = run_case(case, tree, args)
                    results.setdefault((label, case[0], case[4]), []).append(result)
                    print(f"  round {index + 1}: {case[0]} {case[4]} on {label}: {result['s_per_1k']:.2f} s per 1k",
                          file=sys.stderr, flush=True)
    finally:
        if scratch is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch)], check=False)
    print_table(results, trees, args)


def listed(runs: list[dict]) -> str:
    return ", ".join(f"{r['s_per_1k']:.2f}" for r in runs)


def print_table(results: dict, trees: dict, args) -> None:
    header = f"{'run':26s} {'s/1k':>6s} " + " ".join(f"{p:>8s}" for p in PHASES) + "  floor fp32 / bf16 s/1k"
    print(f"{args.iterations - 1} timed iterations each (the first excluded), 256 rollouts per step, "
          f"{os.cpu_count()} cores; native bf16: {cpu_bf16()}")
    print(header)
    for (label, name, precision), runs in results.items():
        if label != "here":
            continue
        s_per_1k = statistics.median(r["s_per_1k"] for r in runs)
        shares = " ".join(f"{100 * statistics.median(r['shares'][p] for r in runs):7.1f}%" for p in PHASES)
        floor = runs[-1]["floor_s_per_1k"]
        print(f"{name + ' ' + precision:26s} {s_per_1k:6.2f} {shares}  {floor['fp32']:.2f} / {floor['bf16']:.2f}"
              + (f"  (runs: {listed(runs)})" if len(runs) > 1 else ""))
    for label in trees:
        if label == "here":
            continue
        print(f"this tree's s per 1k over {label}'s fp32 (median of the paired alternating rounds):")
        for (here, name, precision), mine in results.items():
            if here != "here" or (label, name, "fp32") not in results:
                continue
            base = results[label, name, "fp32"]
            ratio = statistics.median(a["s_per_1k"] / b["s_per_1k"] for a, b in zip(mine, base))
            print(f"  {name} {precision}: {ratio:.3f}x  (here {listed(mine)}; {label} fp32 {listed(base)})")


def compare_update_steps(args) -> None:
    """Median fwd + bwd + Adam step of the actor on one minibatch of the config's shape, fp32 and bf16
    actors alternating in one process (so drifting machine load hits both alike), and their ratio."""
    import dataclasses

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
        *([f"parallel.precision={precision}"] if precision != "fp32" else []), *micro_batch, *args.set])
    history = [r for r in train(cfg) if r["iteration"] > 1]  # the first iteration has nothing to replay
    destroy_parallel()
    return cfg, history


def report(args, cfg, history: list[dict]) -> dict:
    """Seconds per 1k rollouts, phase shares and the update's fp32 and bf16 FLOP floors."""
    import torch

    try:
        from remix_megatron.algorithms import needs_critic
    except ImportError:  # an older tree (--against): GRPO was the one estimator without a critic
        def needs_critic(estimator: str) -> bool:
            return estimator != "grpo"
    from remix_megatron.data.tiny import build_tiny_model

    tiny = build_tiny_model()
    total = sum(r["time/iteration_s"] for r in history)
    rollouts = sum(r["rollouts"] for r in history)
    tokens = sum(r["rollouts"] * r["response_length"] for r in history)
    print(f"{args.config}: {len(history)} iterations, {rollouts} rollouts of {tokens / rollouts:.1f} tokens on average")
    print(f"  seconds per 1k rollouts: {1000 * total / rollouts:.1f} (target <= 4 at ~13-token completions)")
    for phase in PHASES:
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
    bf16_rate = matmul_gflops(dtype=torch.bfloat16)
    print(f"  update: {flops / 1e9:.0f} GFLOP for {rollouts} rollouts at UTD {history[-1]['utd']} x {models} model(s); "
          f"fp32 linear here {rate:.0f} GFLOP/s -> floor {1000 * flops / 1e9 / rate / rollouts:.1f} s per 1k rollouts "
          f"(bf16 {bf16_rate:.0f} GFLOP/s -> {1000 * flops / 1e9 / bf16_rate / rollouts:.1f}; "
          f"measured {1000 * update / rollouts:.1f}, {flops / 1e9 / update:.0f} GFLOP/s)")
    import remix_megatron
    return {"s_per_1k": 1000 * total / rollouts, "rollouts": rollouts,
            "shares": {phase: sum(r[f"time/{phase}_s"] for r in history) / total for phase in PHASES},
            "floor_s_per_1k": {"fp32": 1000 * flops / 1e9 / rate / rollouts,
                               "bf16": 1000 * flops / 1e9 / bf16_rate / rollouts},
            "package": str(Path(remix_megatron.__file__).parent)}


if __name__ == "__main__":
    main()
