"""Cost of the full ReMix actor loss over a bare token cross-entropy, in one forward_backward.

Same tiny actor, same batch, same process, alternating the two losses; prints the median time
of each and their ratio (target: ReMix / CE <= 1.05). Not a timed test: a number to watch.

    .venv/bin/python benchmarks/loss_overhead.py [--seq 256 --batch 8 --micro-batch 2 --reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--preset", default="qwen2-tiny")
    args = parser.parse_args()

    from remix_megatron.algorithms import ActorLossInputs, kl_lambda
    from remix_megatron.algorithms.megatron_adapter import MicroBatch, actor_loss_builder, run_pipeline
    from remix_megatron.config import load_config
    from remix_megatron.models import build_actor, make_trainable
    from remix_megatron.parallel import destroy_parallel, init_parallel

    cfg = load_config(None, [f"model.preset={args.preset}", f"trainer.seq_length={args.seq}",
                             f"trainer.global_batch_size={args.batch}", f"trainer.micro_batch_size={args.micro_batch}"])
    state = init_parallel(cfg)
    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq)
    batches = []
    for _ in range(args.batch // args.micro_batch):
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
        stored = -torch.rand(shape, generator=gen) * 5
        inputs = ActorLossInputs(loss_mask=torch.ones(shape), advantages=torch.randn(shape, generator=gen),
                                 behaviour_logprobs=stored, pik_logprobs=stored + 0.1, ref_logprobs=stored - 0.1,
                                 prev_logprobs=stored, sample_age=torch.arange(args.micro_batch) % 3)
        batches.append(MicroBatch(tokens=tokens, labels=torch.roll(tokens, -1, 1), actor=inputs))

    def cross_entropy(batch, logits):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        per_token = vocab_parallel_cross_entropy(logits.float(), batch.labels)
        mask = batch.actor.loss_mask
        return (per_token * mask).sum(), mask.sum().to(torch.int), {}

    builders = {"ce": lambda batch: partial(cross_entropy, batch),
                "remix": actor_loss_builder(cfg.algorithm, state, kl_lambda=kl_lambda(60, cfg.algorithm))}
    times: dict[str, list[float]] = {name: [] for name in builders}
    for rep in range(args.reps + 2):  # two warm-up rounds
        for name, builder in builders.items():
            actor.zero_grad()
            start = time.perf_counter()
            run_pipeline(actor.chunks, batches, builder, state, forward_only=False)
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    ce, remix = (statistics.median(times[name]) for name in ("ce", "remix"))
    # each rep runs both back to back: the median of the paired ratios is robust to machine drift
    paired = statistics.median(r / c for r, c in zip(times["remix"], times["ce"]))
    print(f"forward_backward, {args.preset}, batch {args.batch} x seq {args.seq} in micro-batches of "
          f"{args.micro_batch}, median of {args.reps}:")
    print(f"  bare token cross-entropy : {ce * 1e3:8.1f} ms")
    print(f"  ReMix actor loss         : {remix * 1e3:8.1f} ms  (Mix-PPG + entropy + KL-convex k3)")
    print(f"  ratio ReMix / CE         : {paired:8.3f}  (median of paired reps; target <= 1.05)")
    destroy_parallel()


if __name__ == "__main__":
    main()
