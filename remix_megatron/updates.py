"""The UTD passes of one iteration: optimizer steps of the actor or the critic over the batch's
minibatches, through Megatron's forward-backward schedule."""

from __future__ import annotations

from typing import Sequence

from remix_megatron.algorithms.megatron_adapter import reduce_metrics, run_pipeline
from remix_megatron.batching import budget_minibatches, micro_batch_group, minibatches
from remix_megatron.parallel import ParallelState


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had NaN/inf gradients."""


def utd_passes(micro_batches: list, *, utd: int, steps: int, seed: Sequence[int], state: ParallelState,
               max_tokens: int = 0, multiple: int = 8, packed: bool = False) -> list[list]:
    """Every minibatch once per UTD pass, in a fresh seeded order each pass: the minibatches of all
    passes. With ``max_tokens`` each minibatch holds the same rows, regrouped under that budget
    (widths rounded up to ``multiple``; ``packed``: rows end to end, lengths a multiple)."""
    group = micro_batch_group(state)
    if not max_tokens:
        return [minibatch for utd_pass in range(utd)
                for minibatch in minibatches(micro_batches, steps, (*seed, utd_pass, state.dp_rank), group)]
    parts = [part for utd_pass in range(utd) for part in minibatches(micro_batches, steps, (*seed, utd_pass, state.dp_rank))]
    return budget_minibatches(parts, max_tokens, multiple, state, packed=packed)


def update(model, passes: list[list], builder, state: ParallelState, counters: dict, limit: int, name: str, *,
           apply: bool = True) -> dict[str, float]:
    """One optimizer step per minibatch; a step with non-finite gradients is skipped, and ``limit``
    in a row stop the run. Returns the metrics merged over all its minibatches (every UTD pass).

    ``apply=False`` (the no_update control) computes losses and gradients and discards them.
    """
    logs, norms, skipped = [], [], 0
    for batches in passes:
        model.zero_grad()
        logs += run_pipeline(model.chunks, batches, builder, state, forward_only=False)
        if not apply:
            model.zero_grad()
            skipped += 1
            continue
        applied, grad_norm = model.step()
        norms.append(float(grad_norm if grad_norm is not None else 0.0))
        key = f"skipped_in_a_row/{name}"
        counters[key] = 0 if applied else counters.get(key, 0) + 1
        if counters[key]:
            skipped += 1
            counters["skipped_total"] = counters.get("skipped_total", 0) + 1
            if state.rank == 0:
                print(f"warning: {name} step skipped: non-finite gradients ({counters[key]} in a row)", flush=True)
        if counters[key] >= limit:
            raise NonFiniteLossError(f"{limit} {name} optimizer steps in a row had NaN/inf gradients "
                                     f"(trainer.max_skipped_steps={limit}); stopping. The last checkpoint is intact: "
                                     "lower the learning rate or check the data, then resume.")
    metrics = reduce_metrics(logs, state)
    finite = [n for n in norms if n == n]
    metrics.update(grad_norm=sum(finite) / len(finite) if finite else (float("nan") if norms else 0.0),
                   step_skipped=float(skipped), optimizer_steps=float(len(passes)))
    return metrics
