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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-iteration", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="store-bench-"))
    try:
        batches = [realistic_records(k, args.per_iteration) for k in range(args.iterations)]
        payload = sum(payload_bytes(b) for b in batches)
        store = open_store(work / "store", create=True)
        start = time.perf_counter()
        for k, records in enumerate(batches):
            half = len(records) // 2
            store.write_shard(k, 0, records[:half])
            store.write_shard(k, 1, records[half:])
            store.publish(k, 2)
        write_s = time.perf_counter() - start
        evict(p for p in (work / "store").rglob("*.parquet"))
        start = time.perf_counter()
        count = sum(len(store.read_iteration(k)) for k in store.iterations())
        read_s = time.perf_counter() - start
        assert count == args.per_iteration * args.iterations
        on_disk = sum(store.info(k).bytes for k in store.iterations())
        raw_write_s, raw_read_s = raw_disk(work / "raw.bin", payload)
        mb = payload / 1e6
        print(f"{count} trajectories, {mb:.0f} MB of token/log-prob/value arrays ({on_disk / 1e6:.0f} MB on disk, zstd)")
        print(f"  write: store {mb / write_s:7.0f} MB/s   raw sequential {mb / raw_write_s:7.0f} MB/s   "
              f"ratio {raw_write_s / write_s:.2f}  (target >= 0.7)")
        print(f"  read : store {mb / read_s:7.0f} MB/s   raw sequential {mb / raw_read_s:7.0f} MB/s   "
              f"ratio {raw_read_s / read_s:.2f}  (target >= 0.7)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
