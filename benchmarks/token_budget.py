"""Padding and forward+backward time of fixed-size against token-budget micro-batches.

A synthetic minibatch with the paper's length distribution (prompts 100-700 tokens, log-normal
responses of median 1,500 capped at 8,192: ``_synthetic.realistic_records``) goes through the
trainer's own path: ``pack`` (every row padded to the batch's longest), the actor's
micro-batches, then ``updates.utd_passes`` with and without ``max_tokens``. Printed: padded
tokens computed per real token at full scale (counting only) and at ``--scale`` (lengths divided
by it, for CPU), and the median time of one forward+backward of the scaled minibatch each way
(the tiny actor, both ways alternated in each rep). Target: padded/real <= 1.1 with the budget.

Then data-parallel balance (``--dp RANKSxROWS,...``, counting only, full scale; the default: the
paper configs' 256-row minibatch on 2 ranks, and on 8): each rank draws its own ROWS rows from
the same distribution (``--minibatches`` draws), and the positions each rank
computes under the budget are compared, the busiest rank over the ranks' mean (a step waits for
the busiest), with the rows where they were drawn and after ``trainer.balance_data_parallel``
moved them (``batching.balance_plan``), and the share of rows moved.

    .venv/bin/python benchmarks/token_budget.py [--rows 64 --micro-batch 1 --scale 32 --reps 5 --dp 2x128,8x32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic import realistic_records  # noqa: E402


def plans(records, *, seq_length: int, micro_batch_size: int, budget: int, state) -> tuple[list, list, float]:
    """The minibatch's fixed and budgeted micro-batches (one optimizer step) and its real tokens."""
    from remix_megatron.algorithms import ActorLossInputs
    from remix_megatron.batching import pack, pack_multiple
    from remix_megatron.updates import utd_passes

    rows = pack(records, seq_length, multiple=pack_multiple(state))
    gen = torch.Generator().manual_seed(0)
    inputs = ActorLossInputs(loss_mask=rows.mask, advantages=torch.randn(rows.mask.shape, generator=gen),
                             behaviour_logprobs=rows.behaviour, pik_logprobs=rows.behaviour,
                             ref_logprobs=rows.behaviour - 0.1, prev_logprobs=rows.behaviour,
                             sample_age=torch.zeros(len(records), dtype=torch.long))
    micro = rows.micro_batches(micro_batch_size, actor=inputs)
    plan = dict(utd=1, steps=1, seed=(0,), state=state)
    fixed, = utd_passes(micro, **plan)
    budgeted, = utd_passes(micro, **plan, max_tokens=budget, multiple=rows.multiple)
    return fixed, budgeted, float(rows.lengths.clamp(max=seq_length).sum())


def padded(batches) -> int:
    return sum(b.tokens.numel() for b in batches)


def dp_balance(ranks: int, rows: int, minibatches: int, seq_length: int, budget: int) -> None:
    """Busiest rank / mean of the positions computed under the budget, drawn vs balanced."""
    from remix_megatron.batching import balance_plan, token_budget_groups

    def computed(widths: list[int]) -> int:  # positions of the rank's budgeted micro-batches
        return sum(len(group) * widths[group[0]] for group in token_budget_groups(widths, budget))

    drawn, balanced, moved = [], [], 0
    for draw in range(minibatches):
        widths = [[min(-(-(r.prompt_tokens.size + r.response_length - 1) // 8) * 8, seq_length)
                   for r in realistic_records(draw, rows, seed=1 + rank)] for rank in range(ranks)]
        plan = balance_plan(widths)
        before = [computed(w) for w in widths]
        after = [computed([widths[src][i] for src, i in mine]) for mine in plan]
        drawn.append(max(before) / (sum(before) / ranks))
        balanced.append(max(after) / (sum(after) / ranks))
        moved += sum(src != rank for rank, mine in enumerate(plan) for src, _ in mine)
    print(f"DP {ranks} x {rows} rows, {minibatches} minibatches: busiest rank / mean positions computed "
          f"{statistics.mean(drawn):.3f} as drawn (worst {max(drawn):.3f}), {statistics.mean(balanced):.3f} balanced "
          f"(worst {max(balanced):.3f}); {100 * moved / (ranks * rows * minibatches):.1f}% of rows moved")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows of the minibatch")
    parser.add_argument("--micro-batch", type=int, default=1, help="rows per fixed micro-batch (the paper configs: 1)")
    parser.add_argument("--scale", type=int, default=32, help="lengths divided by this for the timed CPU run")
    parser.add_argument("--budget-rows", type=float, default=1.0,
                        help="budget in full-length rows (the paper configs: 1, max_tokens = seq_length)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--preset", default="qwen2-tiny")
    parser.add_argument("--dp", default="2x128,8x32", help="RANKSxROWS per rank for the balance count ('': skip)")
    parser.add_argument("--minibatches", type=int, default=20, help="minibatches drawn for the balance count")
    args = parser.parse_args()
    for layout in filter(None, args.dp.split(",")):
        ranks, rows = (int(n) for n in layout.split("x"))
        dp_balance(ranks, rows, args.minibatches, 8960, int(args.budget_rows * 8960))

    from remix_megatron.algorithms import kl_lambda
    from remix_megatron.algorithms.megatron_adapter import actor_loss_builder, run_pipeline
    from remix_megatron.config import load_config
    from remix_megatron.models import build_actor, make_trainable
    from remix_megatron.parallel import destroy_parallel, init_parallel

    full_seq = 8960  # the paper configs' seq_length: 766 prompt + 8,192 response tokens
    seq = -(-full_seq // args.scale // 8) * 8
    cfg = load_config(None, [f"model.preset={args.preset}", f"trainer.seq_length={seq}",
                             f"trainer.global_batch_size={args.rows}", f"trainer.micro_batch_size={args.micro_batch}"])
    state = init_parallel(cfg)
    print(f"{args.rows} rows, fixed micro-batches of {args.micro_batch} row(s) at the batch's width, "
          f"budget {args.budget_rows:g} x seq_length")
    for scale, seq_length in ((1, full_seq), (args.scale, seq)):
        records = realistic_records(0, args.rows, max_response=8192 // scale, median_response=1500 // scale,
                                    prompt_tokens=(max(100 // scale, 1), 700 // scale), vocab=cfg.model.vocab_size)
        fixed, budgeted, real = plans(records, seq_length=seq_length, micro_batch_size=args.micro_batch,
                                      budget=int(args.budget_rows * seq_length), state=state)
        print(f"  lengths / {scale:<3} (seq_length {seq_length}): padded/real fixed {padded(fixed) / real:.2f} "
              f"({len(fixed)} micro-batches), token budget {padded(budgeted) / real:.3f} "
              f"({len(budgeted)} micro-batches)")

    actor = make_trainable(build_actor(cfg.model, state), cfg.actor_optimizer, cfg.parallel, state)
    builder = actor_loss_builder(cfg.algorithm, state, kl_lambda=kl_lambda(1, cfg.algorithm))
    times: dict[str, list[float]] = {"fixed": [], "budget": []}
    for rep in range(args.reps + 1):  # one warm-up round
        for name, batches in (("fixed", fixed), ("budget", budgeted)):
            actor.zero_grad()
            start = time.perf_counter()
            run_pipeline(actor.chunks, batches, builder, state, forward_only=False)
            if rep:
                times[name].append(time.perf_counter() - start)
    paired = statistics.median(f / b for f, b in zip(times["fixed"], times["budget"]))
    print(f"forward+backward of the scaled minibatch ({args.preset}, median of {args.reps}): fixed "
          f"{statistics.median(times['fixed']):.2f} s, token budget {statistics.median(times['budget']):.2f} s, "
          f"fixed / budget {paired:.2f}x")
    destroy_parallel()


if __name__ == "__main__":
    main()
