"""Deterministic synthetic trajectories for store tests (also run by the crash subprocesses)."""

from __future__ import annotations

import numpy as np

from remix_megatron.store import Trajectory


def make_records(iteration: int, count: int, *, group_size: int = 1, seed: int = 0, extra: tuple[str, ...] = (),
                 with_values: bool = True, first_group: int = 0) -> list[Trajectory]:
    rng = np.random.default_rng([seed, iteration, first_group])
    records = []
    for i in range(count):
        length = 0 if i % 7 == 3 else int(rng.integers(1, 40))  # some empty (aborted) responses
        records.append(Trajectory(
            iteration=iteration, prompt_id=f"it{iteration}-p{first_group + i // group_size}-r{i % group_size}-π",
            group_id=first_group + i // group_size, prompt_tokens=rng.integers(0, 30000, int(rng.integers(1, 20))),
            response_tokens=rng.integers(0, 30000, length), reward=float(rng.integers(0, 2)),
            behaviour_logprobs=-rng.random(length).astype(np.float32) * 5,
            finish_reason=("stop", "length", "abort")[int(rng.integers(0, 3))],
            values=rng.standard_normal(length).astype(np.float32) if with_values else None,
            extra={name: float(rng.standard_normal()) for name in extra}))
    return records


def same_records(actual, expected) -> bool:
    return len(actual) == len(expected) and all(a.same_as(b) for a, b in zip(actual, expected))
