"""Synthetic trajectories of realistic sizes shared by the store benchmarks."""

from __future__ import annotations

import numpy as np

from remix_megatron.store import Trajectory


def realistic_records(iteration: int, count: int, *, seed: int = 0, max_response: int = 8192,
                      median_response: int = 1500, first_group: int = 0, prompt_tokens: tuple[int, int] = (100, 700),
                      vocab: int = 150_000) -> list[Trajectory]:
    """Prompts of 100-700 tokens (``prompt_tokens``), log-normal response lengths (median ``median_response``)."""
    rng = np.random.default_rng([seed, iteration, first_group])
    lengths = np.minimum(rng.lognormal(np.log(median_response), 0.8, count).astype(int) + 1, max_response)
    return [Trajectory(iteration=iteration, prompt_id=f"{iteration}-{first_group + i}", group_id=first_group + i,
                       prompt_tokens=rng.integers(0, vocab, int(rng.integers(*prompt_tokens)), dtype=np.int32),
                       response_tokens=rng.integers(0, vocab, n, dtype=np.int32), reward=float(rng.integers(0, 2)),
                       behaviour_logprobs=-rng.exponential(1.0, n).astype(np.float32),
                       values=rng.standard_normal(n).astype(np.float32), finish_reason="stop")
            for i, n in enumerate(lengths.tolist())]


def payload_bytes(records: list[Trajectory]) -> int:
    """Bytes of array data the records carry (tokens, log-probs, values)."""
    return sum(r.prompt_tokens.nbytes + r.response_tokens.nbytes + r.behaviour_logprobs.nbytes
               + (r.values.nbytes if r.values is not None else 0) for r in records)
