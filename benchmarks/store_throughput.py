"""Trajectory store write/read throughput vs raw sequential disk bandwidth, same run, same disk.

Writes ``--iterations`` iterations of ``--per-iteration`` realistic trajectories (2 shards
each, published), reads them back as records, and compares the payload bytes per second
with writing (and fsyncing) and reading the same number of bytes as one plain file.
Target: store / raw >= 0.7 for writing and reading. Before each read the files' pages are
evicted from the page cache (posix_fadvise DONTNEED, no privileges needed), so both reads
come from the disk.

    .venv/bin/python benchmarks/store_throughput.py [--per-iteration 256 --iterations 4 --dir /tmp]
"""

from __future__ import annotations

import argparse
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


def raw_disk(path: Path, size: int) -> tuple[float, float]:
    block = os.urandom(8 << 20)
    start = time.perf_counter()
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            written += handle.write(block[: min(len(block), size - written)])
        handle.flush()
        os.fsync(handle.fileno())
    write_s = time.perf_counter() - start
    evict([path])
    start = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(8 << 20):
            pass
    return write_s, time.perf_counter() - start


def measure(work: Path, batches, compression: str, row_group_size: int) -> tuple[float, float, int]:
    """Seconds to write + publish every iteration, seconds to read them back (from the disk), bytes."""
    root = work / f"store-{compression}"
    store = open_store(root, create=True, compression=compression, row_group_size=row_group_size)
    start = time.perf_counter()
    for k, records in enumerate(batches):
        half = len(records) // 2
        store.write_shard(k, 0, records[:half])
        store.write_shard(k, 1, records[half:])
        store.publish(k, 2)
    write_s = time.perf_counter() - start
    evict(p for p in root.rglob("*.arrow"))
    start = time.perf_counter()
    count = sum(len(store.read_iteration(k)) for k in store.iterations())
    read_s = time.perf_counter() - start
    assert count == sum(len(b) for b in batches)
    return write_s, read_s, sum(store.info(k).bytes for k in store.iterations())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-iteration", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--compression", default="zstd,lz4,none", help="codecs to measure (store.compression)")
    parser.add_argument("--row-group-size", type=int, default=16, help="records per record batch")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="store-bench-"))
    try:
        batches = [realistic_records(k, args.per_iteration) for k in range(args.iterations)]
        payload = sum(payload_bytes(b) for b in batches)
        mb = payload / 1e6
        print(f"{sum(map(len, batches))} trajectories, {mb:.0f} MB of token/log-prob/value arrays, "
              f"{args.row_group_size} records per batch; raw = one plain file of the same bytes, measured before and "
              "after each store run (mean)")
        measure(work / "warm-up", [realistic_records(0, 8)], "zstd", 4)  # one-time imports (pyarrow -> pandas)
        for compression in args.compression.split(","):
            before = raw_disk(work / "raw.bin", payload)
            write_s, read_s, on_disk = measure(work, batches, compression, args.row_group_size)
            after = raw_disk(work / "raw.bin", payload)
            raw_write_s, raw_read_s = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            print(f"{compression:5s} ({on_disk / 1e6:.0f} MB on disk)")
            print(f"  write: store {mb / write_s:7.0f} MB/s   raw sequential {mb / raw_write_s:7.0f} MB/s   "
                  f"ratio {raw_write_s / write_s:.2f}  (target >= 0.7)")
            print(f"  read : store {mb / read_s:7.0f} MB/s   raw sequential {mb / raw_read_s:7.0f} MB/s   "
                  f"ratio {raw_read_s / read_s:.2f}  (target >= 0.7)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
