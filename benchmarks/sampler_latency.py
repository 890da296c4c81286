"""Latency and memory of sampling one mixed batch (B=256) from a large trajectory store.

Builds a store of ``--trajectories`` realistic trajectories (256 per iteration, 2 shards
each), then times ``MixedSampler.sample`` for the last iterations (p = 0.4, N = 2): the whole
batch on one rank and one rank's share of 8. Reports the median latency (target < 50 ms)
and the peak Arrow and Python/numpy memory while sampling, next to the store's size. The default size is
quick; ``--trajectories 1000000`` is the full-size run (about 27 GB of disk at the default
lengths; use --median-response to shrink).

    .venv/bin/python benchmarks/sampler_latency.py [--trajectories 8192 --dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import realistic_records  # noqa: E402

from remix_megatron.store import MixedSampler, open_store  # noqa: E402

PER_ITERATION = 256


def _nbytes(record) -> int:
    return sum(a.nbytes for a in (record.prompt_tokens, record.response_tokens, record.behaviour_logprobs,
                                  record.values) if a is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=8192)
    parser.add_argument("--median-response", type=int, default=1500)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="sampler-bench-"))
    try:
        store = open_store(work / "store", create=True)
        iterations = max(args.trajectories // PER_ITERATION, 3)
        start = time.perf_counter()
        for k in range(iterations):
            for rank in range(2):
                store.write_shard(k, rank, realistic_records(k, PER_ITERATION // 2,
                                                            median_response=args.median_response,
                                                            first_group=rank * PER_ITERATION // 2))
            store.publish(k, 2)
        build_s = time.perf_counter() - start
        size = sum(store.info(k).bytes for k in store.iterations())
        print(f"store: {iterations * PER_ITERATION} trajectories in {iterations} iterations, "
              f"{size / 1e9:.2f} GB on disk (built in {build_s:.0f} s)")
        sampler = MixedSampler(groups_per_step=PER_ITERATION, window=2, fresh_multiple_of=8, seed=0)
        for label, dp_size in (("whole batch, 1 rank", 1), ("one rank of 8", 8)):
            times, peaks = [], []
            for rep in range(args.reps + 1):
                k = iterations - 1 - rep % (iterations - 2)
                pool = pa.default_memory_pool()
                before = pool.bytes_allocated()
                start = time.perf_counter()
                batch = sampler.sample(store, k, 0.4, dp_rank=0, dp_size=dp_size)
                elapsed = time.perf_counter() - start
                if rep:  # the first is a warm-up
                    times.append(elapsed)
                    peaks.append(pool.max_memory() - before)
            rows = len(batch.trajectories)
            del batch
            tracemalloc.start()  # Python and numpy allocations of one more (untimed) sample
            batch = sampler.sample(store, iterations - 1, 0.4, dp_rank=0, dp_size=dp_size)
            python_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"  {label:20s}: {rows:3d} trajectories, median {statistics.median(times) * 1e3:6.1f} ms "
                  f"(target < 50 ms), peak memory: Arrow <= {max(peaks) / 1e6:.0f} MB, Python + numpy "
                  f"{python_peak / 1e6:.0f} MB (the batch itself: "
                  f"{sum(_nbytes(t) for t in batch.trajectories) / 1e6:.0f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
