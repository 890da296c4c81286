"""Trajectory store write/read throughput vs raw sequential disk bandwidth, same run, same disk.

Writes ``--iterations`` iterations of ``--per-iteration`` realistic trajectories, one shard per
writer rank per iteration, and reads them back as records, then compares the payload bytes
per second (token ids, log-probs, values) with writing (and fsyncing) and reading the same
number of bytes as one plain file. Target: store / raw >= 0.7 for writing and reading.

- ``--writers 1,2``: each count is measured. With W writers, W processes play the DP ranks
  of the trainer: each writes its own shard of every iteration, rank 0 publishes the
  iteration after all W shards are complete, and for reading each process reads its own
  rank's shards back (``iter_shards``: the disk reads the next shards while one is decoded).
  Time runs from the common start to the last process's end.
- raw: one plain file of the same bytes, the better of a plain write + fsync / read and the
  same with the page-cache hints the store uses (early write-back, read-ahead), measured
  before and after each store run (mean of the two).
- Before each read, the files' pages are evicted from the page cache (posix_fadvise
  DONTNEED, no privileges needed), so every read comes from the disk.

    .venv/bin/python benchmarks/store_throughput.py [--per-iteration 256 --iterations 8 --writers 1,2 --dir /tmp]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import payload_bytes, realistic_records  # noqa: E402

from remix_megatron.store import open_store  # noqa: E402


def evict(paths) -> None:
    """Drop the files' clean pages from the page cache so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_disk(path: Path, size: int, hints: bool) -> tuple[float, float]:
    """Seconds to write + fsync ``size`` bytes as one file, and to read them back from the disk."""
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    written = 0
    while written < size:
        done = os.write(fd, block[: min(len(block), size - written)])
        if hints:
            os.posix_fadvise(fd, written, done, os.POSIX_FADV_DONTNEED)  # start its write-back now
        written += done
    os.fsync(fd)
    os.close(fd)
    write_s = time.perf_counter() - start
    evict([path])
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    if hints:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    while os.read(fd, 8 << 20):
        pass
    os.close(fd)
    return write_s, time.perf_counter() - start


def _worker(root: str, rank: int, writers: int, args, barrier, results) -> None:
    """One writer rank: its shard of every iteration, then (after eviction) reading them back."""
    batches = []
    for k in range(args.iterations):
        per_rank = args.per_iteration // writers
        batches.append(realistic_records(k, per_rank, first_group=rank * per_rank))
    # one-time costs (imports, thread pools, the allocator growing its heap) before timing
    warm = open_store(f"{root}-warm-up-{rank}", create=True, compression=args.compression)
    warm.write_shard(0, 0, batches[0])
    warm.publish(0, 1)
    warm.read_iteration(0)
    shutil.rmtree(warm.root)
    store = open_store(root, compression=args.compression, row_group_size=args.row_group_size)
    barrier.wait()  # every process has its records and its imports
    start = time.perf_counter()
    for k, records in enumerate(batches):
        store.write_shard(k, rank, records)
        barrier.wait()
        if rank == 0:
            store.publish(k, writers)
    barrier.wait()
    write = (start, time.perf_counter())
    if rank == 0:
        evict(Path(root).rglob("*.arrow"))
    barrier.wait()
    start = time.perf_counter()
    rows = sum(len(records) for _, _, records in store.iter_shards(rank=rank))  # reading ahead of decoding
    results.put((rank, write, (start, time.perf_counter()), rows, sum(payload_bytes(b) for b in batches)))


def measure(root: Path, writers: int, args) -> tuple[float, float, int]:
    """Seconds to write + publish every iteration and to read it back, with ``writers`` processes; bytes."""
    open_store(root, create=True)
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(writers), context.Queue()
    procs = [context.Process(target=_worker, args=(str(root), rank, writers, args, barrier, results))
             for rank in range(writers)]
    for proc in procs:
        proc.start()
    outcome = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a writer process exited with {proc.exitcode}")
    span = lambda i: max(o[i][1] for o in outcome) - min(o[i][0] for o in outcome)  # noqa: E731
    assert sum(o[3] for o in outcome) == (args.per_iteration // writers) * writers * args.iterations
    store = open_store(root)
    return span(1), span(2), sum(store.info(k).bytes for k in store.iterations()), sum(o[4] for o in outcome)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-iteration", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--writers", default="1,2", help="writer-process counts to measure")
    parser.add_argument("--compression", default="zstd,lz4,none", help="codecs to measure (store.compression)")
    parser.add_argument("--row-group-size", type=int, default=16, help="records per record batch")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="store-bench-"))
    try:
        probe = [realistic_records(k, args.per_iteration) for k in range(args.iterations)]
        payload = sum(payload_bytes(b) for b in probe)
        del probe
        print(f"{args.iterations} x {args.per_iteration} trajectories, about {payload / 1e6:.0f} MB of token/log-prob/"
              f"value arrays, {args.row_group_size} records per batch, {os.cpu_count()} cores")
        print(f"{'codec':5s} {'writers':>7s} {'on disk':>8s} | {'write MB/s':>10s} {'raw':>6s} {'ratio':>5s} | "
              f"{'read MB/s':>9s} {'raw':>6s} {'ratio':>5s}   (target ratio >= 0.7)")
        for compression in args.compression.split(","):
            for writers in map(int, args.writers.split(",")):
                point = argparse.Namespace(**{**vars(args), "compression": compression})
                before = [raw_disk(work / "raw.bin", payload, hints) for hints in (False, True)]
                write_s, read_s, on_disk, nbytes = measure(work / f"store-{compression}-{writers}", writers, point)
                after = [raw_disk(work / "raw.bin", payload, hints) for hints in (False, True)]
                raw_write = min((b[0] + a[0]) / 2 for b, a in zip(before, after)) / payload  # s per byte
                raw_read = min((b[1] + a[1]) / 2 for b, a in zip(before, after)) / payload
                mb = nbytes / 1e6
                print(f"{compression:5s} {writers:7d} {on_disk / 1e6:6.0f}MB | {mb / write_s:10.0f} "
                      f"{1e-6 / raw_write:6.0f} {raw_write * nbytes / write_s:5.2f} | {mb / read_s:9.0f} "
                      f"{1e-6 / raw_read:6.0f} {raw_read * nbytes / read_s:5.2f}")
                shutil.rmtree(work / f"store-{compression}-{writers}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
