"""A sharded on-disk trajectory store indexed by policy iteration.

Layout (one directory, local or shared filesystem)::

    STORE.json                          format, layout and schema versions, declared extra columns
    iter_00000012/shard_r00003.arrow    one shard per writer rank per iteration: an Arrow IPC file,
                                        zstd-compressed record batches of ``row_group_size`` rows
    iter_00000012/shard_r00003.index.json  the shard's batch index (offset, length, rows, CRC32)
    manifests/iter_00000012.json        the iteration's index: shards, their batch indexes, row
                                        counts, group ids, stats
    INDEX.json                          the published iterations, each with its manifest's SHA-256

An iteration is visible only once INDEX.json lists it. Shards (index first, then data) are
written to temporary names, fsynced and renamed; the manifest is written the same way, after
every shard of the iteration is complete, and then INDEX.json (atomically) with the new
entry. Deleting iterations removes their entries first. So a crash (kill -9) at any point
leaves every earlier iteration readable and the partial one invisible; ``open_store(...,
cleanup=True)`` (the publishing rank, before the others write) deletes its remains, which
are only ever newer than the last published iteration (or older than the first, after a
prune): the shards of an iteration inside the published range are never deleted. A deleted
or edited manifest, an emptied ``manifests/``, a shard path other than the iteration's own,
or a group id that differs from the shard's column is a ``StoreError`` naming the file.

Every record batch is read through its CRC32 (the manifest's), so a flipped, truncated or
replaced byte is an error, and a reader that needs a few rows reads only their batches.
Nothing is pickled; nothing is skipped silently: a schema mismatch or a corrupted shard
raises ``StoreError`` naming the file. Shards are ordinary Arrow IPC files
(``pyarrow.ipc.open_file`` / ``pandas.read_feather`` read them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from remix_megatron.fileio import atomic_write_text, fsync_dir
from remix_megatron.registry import Registry
from remix_megatron.store.record import SCHEMA_VERSION, Trajectory, arrow_schema, from_table, to_table

FORMAT = "remix-trajectory-store"
LAYOUT_VERSION = 3  # 1: Parquet shards (page CRCs); 2: Arrow IPC shards with a CRC32 batch index; 3: + INDEX.json
#: store.compression -> the Arrow IPC codec of each record-batch buffer (readers need not know which)
COMPRESSIONS: Registry[str | None] = Registry("store compression")
COMPRESSIONS.register("zstd", "zstd")
COMPRESSIONS.register("lz4", "lz4")
COMPRESSIONS.register("none", None)
_ITER = re.compile(r"^iter_(\d{8})$")
_SHARD = re.compile(r"^shard_r(\d{5})\.arrow$")
_MANIFEST = re.compile(r"^iter_(\d{8})\.json$")
_INDEX = "INDEX.json"
_WRITEBACK_BYTES = 1 << 20  # a shard writer starts the disk write of every 1 MiB it has written
_READ_AHEAD_BYTES = 256 << 20  # iter_shards queues the disk reads of this much of the following shards


class StoreError(RuntimeError):
    """The store on disk is not what it must be (schema, corruption, missing data)."""


def _advise(fd: int, offset: int, length: int, advice: str) -> None:
    """A page-cache hint (Linux): "DONTNEED" on dirty pages starts their write-back now, so the
    disk writes while the writer encodes the next batches and the final fsync finds little left;
    "WILLNEED" queues the read of a range now, so the disk reads ahead of the checksum/decode
    work (and of the next shard). A no-op where the platform has no posix_fadvise."""
    if hasattr(os, "posix_fadvise") and length > 0:
        os.posix_fadvise(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))


def _atomic_write_json(path: Path, payload: dict) -> str:
    """Write ``payload`` atomically; returns the SHA-256 of the bytes written."""
    text = json.dumps(payload, indent=1)  # ASCII: the bytes on disk are text.encode()
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class BatchInfo:
    offset: int  # byte offset of the record batch's IPC message in the shard file
    length: int  # bytes of the message (metadata + compressed body)
    rows: int
    crc32: int  # zlib.crc32 of those bytes


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the store root
    rank: int
    rows: int
    bytes: int
    batches: tuple[BatchInfo, ...] = ()
    group_ids: tuple[int, ...] = ()  # per row, so the sampler plans without reading shards

    @staticmethod
    def from_json(payload: dict) -> "ShardInfo":
        return ShardInfo(file=payload["file"], rank=payload["rank"], rows=payload["rows"], bytes=payload["bytes"],
                         batches=tuple(BatchInfo(*b) for b in payload["batches"]),
                         group_ids=tuple(payload["group_ids"]))

    def to_json(self) -> dict:
        return {"file": self.file, "rank": self.rank, "rows": self.rows, "bytes": self.bytes,
                "batches": [[b.offset, b.length, b.rows, b.crc32] for b in self.batches],
                "group_ids": list(self.group_ids)}


@dataclass(frozen=True)
class IterationInfo:
    iteration: int
    rows: int
    bytes: int
    mean_reward: float
    mean_response_length: float
    shards: tuple[ShardInfo, ...]


class _ChecksummingFile:
    """The write-only file Arrow's IPC writer writes through: CRC32 of the current record batch.

    The IPC file starts with 8 magic bytes and the schema message (0xFFFFFFFF, int32 metadata
    length, metadata); the first batch begins after it. ``segment()`` ends one batch's bytes.
    """

    def __init__(self, handle) -> None:
        self.handle, self.position, self.crc, self.start = handle, 0, 0, None
        self._head = bytearray()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.start is None:
            self._head += view[: max(0, 16 - len(self._head))]
            if len(self._head) >= 16:
                self.start = 16 + struct.unpack_from("<i", self._head, 12)[0]
        if self.start is not None and self.position + len(view) > self.start:
            self.crc = zlib.crc32(view[max(0, self.start - self.position):], self.crc)
        self.position += len(view)
        self.handle.write(view)
        return len(view)

    def segment(self, rows: int) -> BatchInfo:
        batch = BatchInfo(offset=self.start, length=self.position - self.start, rows=rows, crc32=self.crc)
        self.start, self.crc = self.position, 0
        return batch

    def flush(self) -> None:
        self.handle.flush()

    def tell(self) -> int:
        return self.position

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def close(self) -> None:  # the ShardWriter closes the real file after fsync
        pass


class ShardWriter:
    """Streams records of one (iteration, rank) shard; the file appears complete or not at all."""

    def __init__(self, store: "TrajectoryStore", iteration: int, rank: int) -> None:
        self._store, self.iteration, self.rank = store, iteration, rank
        self.path = store.shard_path(iteration, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self._handle = open(self._tmp, "wb")
        self._sink = _ChecksummingFile(self._handle)
        self._writer = pa.ipc.new_file(pa.PythonFile(self._sink, mode="w"), arrow_schema(store.extra_columns),
                                       options=pa.ipc.IpcWriteOptions(compression=COMPRESSIONS.get(store.compression),
                                                                      use_threads=True))
        self.rows, self._batches, self._group_ids = 0, [], []
        self._reward_sum = self._length_sum = 0.0
        self._written_back = 0  # bytes whose write-back has been started

    def write(self, records: Sequence[Trajectory]) -> None:
        for record in records:
            if record.iteration != self.iteration:
                raise ValueError(f"trajectory {record.prompt_id!r} of iteration {record.iteration} written to "
                                 f"iteration {self.iteration}")
        size = self._store.row_group_size
        for first in range(0, len(records), size):  # converted batch by batch: the copies stay cache-sized
            batch = to_table(records[first:first + size], self._store.extra_columns).to_batches()[0]
            self._writer.write_batch(batch)
            self._batches.append(self._sink.segment(batch.num_rows))
            if self._sink.position - self._written_back >= _WRITEBACK_BYTES:
                self._handle.flush()
                _advise(self._handle.fileno(), self._written_back, self._sink.position - self._written_back, "DONTNEED")
                self._written_back = self._sink.position
        self.rows += len(records)
        self._group_ids += [r.group_id for r in records]
        self._reward_sum += sum(r.reward for r in records)
        self._length_sum += sum(r.response_length for r in records)

    def commit(self) -> Path:
        self._writer.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        index = {"schema_version": SCHEMA_VERSION, "rows": self.rows, "bytes": self._sink.position,
                 "batches": [[b.offset, b.length, b.rows, b.crc32] for b in self._batches],
                 "group_ids": self._group_ids, "reward_sum": self._reward_sum, "length_sum": self._length_sum}
        # The index needs no fsync: publish copies it into the (durable) manifest, and an
        # iteration cut by a machine crash before that is discarded. The data is fsynced above;
        # publish makes the directory entries durable before the manifest.
        atomic_write_text(self._store.index_path(self.iteration, self.rank), json.dumps(index), durable=False)
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._handle.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class TrajectoryStore:
    """Read/write access to one store directory. Create or open one with ``open_store``."""

    def __init__(self, root: Path, extra_columns: tuple[str, ...], row_group_size: int,
                 compression: str = "zstd") -> None:
        COMPRESSIONS.get(compression)  # ValueError listing the registered ones
        self.root, self.extra_columns, self.row_group_size = root, extra_columns, row_group_size
        self.compression = compression
        # Published iterations are immutable; a cache entry is valid while its manifest file is
        # the same one (pruning and re-publishing an iteration number replaces the file).
        self._cache: dict[tuple, object] = {}

    def _cached(self, kind: str, iteration: int, compute):
        try:
            stat = self.manifest_path(iteration).stat()
        except FileNotFoundError:
            return compute()  # raises the informative error
        key = (kind, iteration, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = compute()
        return self._cache[key]

    # paths -------------------------------------------------------------------------------
    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:08d}"

    def shard_path(self, iteration: int, rank: int) -> Path:
        return self.iteration_dir(iteration) / f"shard_r{rank:05d}.arrow"

    def index_path(self, iteration: int, rank: int) -> Path:
        return self.iteration_dir(iteration) / f"shard_r{rank:05d}.index.json"

    def manifest_path(self, iteration: int) -> Path:
        return self.root / "manifests" / f"iter_{iteration:08d}.json"

    # index -------------------------------------------------------------------------------
    def _index(self) -> dict[int, str]:
        """INDEX.json: {published iteration: its manifest's SHA-256} (re-read whenever the file changed)."""
        path = self.root / _INDEX
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{path} is missing: the store's list of published iterations was deleted") from None
        key = ("index", stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key not in self._cache:
            try:
                entries = {int(k): str(v) for k, v in json.loads(path.read_text())["iterations"].items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
                raise StoreError(f"{path}: corrupted store index ({error!r})") from None
            self._cache[key] = entries
        return self._cache[key]

    def _write_index(self, entries: dict[int, str]) -> None:
        _atomic_write_json(self.root / _INDEX, {"iterations": {str(k): entries[k] for k in sorted(entries)}})

    def iterations(self) -> list[int]:
        """Published iterations, ascending (re-read from disk whenever INDEX.json changed)."""
        return sorted(self._index())

    def is_published(self, iteration: int) -> bool:
        return iteration in self._index()

    def _manifest_files(self) -> list[int]:
        """Iterations with a manifest file (published or the remains of an interrupted publish / removal)."""
        return sorted(int(m.group(1)) for p in (self.root / "manifests").iterdir() if (m := _MANIFEST.match(p.name)))

    def info(self, iteration: int) -> IterationInfo:
        return self._cached("info", iteration, lambda: self._read_manifest(iteration))

    def _read_manifest(self, iteration: int) -> IterationInfo:
        path, published = self.manifest_path(iteration), self._index()
        if iteration not in published:
            raise StoreError(f"iteration {iteration} is not in the store {self.root} "
                             f"(published: {_ranges(sorted(published))})")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path} is missing but {self.root / _INDEX} lists iteration {iteration}: the store "
                             "was changed; restore the manifest or start a new store") from None
        if hashlib.sha256(data).hexdigest() != published[iteration]:
            raise StoreError(f"{path}: corrupted manifest (not the one published: its SHA-256 differs from "
                             f"{_INDEX}'s; edited or damaged)")
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as error:
            raise StoreError(f"{path}: corrupted manifest ({error})") from None
        if payload.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {payload.get('schema_version')} but this code reads "
                             f"version {SCHEMA_VERSION}")
        try:
            shards = tuple(ShardInfo.from_json(shard) for shard in payload["shards"])
        except (KeyError, TypeError) as error:
            raise StoreError(f"{path}: corrupted manifest (bad shard entry: {error!r})") from None
        for position, shard in enumerate(shards):  # every path stays inside the store: the iteration's own shards
            expected = str(self.shard_path(iteration, position).relative_to(self.root))
            if shard.rank != position or shard.file != expected or len(shard.group_ids) != shard.rows:
                raise StoreError(f"{path}: shard entry {position} names {shard.file!r} (rank {shard.rank}, "
                                 f"{len(shard.group_ids)} group ids for {shard.rows} rows); expected {expected!r}")
        return IterationInfo(iteration=payload["iteration"], rows=payload["rows"], bytes=payload["bytes"],
                             mean_reward=payload["mean_reward"], mean_response_length=payload["mean_response_length"],
                             shards=shards)

    # writing -----------------------------------------------------------------------------
    def shard_writer(self, iteration: int, rank: int) -> ShardWriter:
        if iteration < 0 or rank < 0:
            raise ValueError(f"iteration={iteration} and rank={rank} must be >= 0")
        if self.is_published(iteration):
            raise StoreError(f"iteration {iteration} is already published in {self.root}; shards are immutable")
        return ShardWriter(self, iteration, rank)

    def write_shard(self, iteration: int, rank: int, records: Sequence[Trajectory]) -> Path:
        with self.shard_writer(iteration, rank) as writer:
            writer.write(records)
        return writer.path

    def publish(self, iteration: int, num_writers: int) -> IterationInfo:
        """Make ``iteration`` visible once the shards of ranks 0..num_writers-1 are all complete."""
        if self.is_published(iteration):
            raise StoreError(f"iteration {iteration} is already published in {self.root}")
        directory = self.iteration_dir(iteration)
        found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SHARD.match(p.name))) \
            if directory.is_dir() else []
        if found != list(range(num_writers)):
            raise StoreError(f"cannot publish iteration {iteration}: expected shards of ranks 0..{num_writers - 1}, "
                             f"found ranks {found} in {directory}")
        shards, reward_sum, length_sum = [], 0.0, 0.0
        for rank in found:
            path, index_path = self.shard_path(iteration, rank), self.index_path(iteration, rank)
            try:
                index = json.loads(index_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError) as error:
                raise StoreError(f"cannot publish iteration {iteration}: {index_path} is missing or corrupted "
                                 f"({error})") from None
            size = path.stat().st_size
            if size != index["bytes"] or index.get("schema_version") != SCHEMA_VERSION:
                raise StoreError(f"cannot publish iteration {iteration}: {path} has {size} bytes, schema version "
                                 f"{index.get('schema_version')}; its index says {index['bytes']}, {SCHEMA_VERSION}")
            shards.append(ShardInfo(file=str(path.relative_to(self.root)), rank=rank, rows=index["rows"], bytes=size,
                                    batches=tuple(BatchInfo(*b) for b in index["batches"]),
                                    group_ids=tuple(index["group_ids"])))
            reward_sum, length_sum = reward_sum + index["reward_sum"], length_sum + index["length_sum"]
        rows = sum(shard.rows for shard in shards)
        info = IterationInfo(iteration=iteration, rows=rows, bytes=sum(s.bytes for s in shards),
                             mean_reward=reward_sum / rows if rows else 0.0,
                             mean_response_length=length_sum / rows if rows else 0.0, shards=tuple(shards))
        fsync_dir(directory)  # every shard's rename is durable before the manifest is
        payload = {"schema_version": SCHEMA_VERSION, "iteration": iteration, "rows": info.rows, "bytes": info.bytes,
                   "mean_reward": info.mean_reward, "mean_response_length": info.mean_response_length,
                   "shards": [shard.to_json() for shard in shards]}
        digest = _atomic_write_json(self.manifest_path(iteration), payload)
        self._write_index({**self._index(), iteration: digest})  # the commit point
        return info

    # reading -----------------------------------------------------------------------------
    def _check_schema(self, path: Path, head: bytes) -> pa.Schema:
        """The shard's own schema (from its first bytes), checked against this store's."""
        try:
            if len(head) < 16 or head[:6] != b"ARROW1":
                raise ValueError("not an Arrow IPC file")
            end = 16 + struct.unpack_from("<i", head, 12)[0]
            if len(head) < end:
                raise ValueError("schema message cut off")
            schema = pa.ipc.read_schema(pa.py_buffer(head[8:end]))
            metadata = schema.metadata or {}
            version = metadata.get(b"remix.schema_version", b"?").decode()
            extra = json.loads(metadata.get(b"remix.extra_columns", b"null"))
            names = schema.names
        except (pa.ArrowException, ValueError, struct.error, OSError) as error:  # OSError: a bad flatbuffer
            raise StoreError(f"{path}: unreadable or corrupted shard ({error})") from None
        if version != str(SCHEMA_VERSION) or extra != list(self.extra_columns):
            raise StoreError(f"{path}: schema version {version} with extra columns {extra}; this store expects "
                             f"version {SCHEMA_VERSION} with {list(self.extra_columns)}")
        expected = arrow_schema(self.extra_columns)
        if not schema.equals(expected):
            raise StoreError(f"{path}: columns {names} / types differ from this store's schema")
        return expected

    def _decode(self, path: Path, schema: pa.Schema, index: int, batch: BatchInfo, data) -> pa.RecordBatch:
        """One record batch from its bytes, after its CRC32 check."""
        if len(data) != batch.length or zlib.crc32(data) != batch.crc32:
            raise StoreError(f"{path}: unreadable or corrupted shard (record batch {index}, bytes {batch.offset}.."
                             f"{batch.offset + batch.length}: checksum mismatch)")
        try:
            decoded = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), schema)
        except (pa.ArrowException, OSError) as error:
            raise StoreError(f"{path}: unreadable or corrupted shard (record batch {index}: {error})") from None
        if decoded.num_rows != batch.rows:
            raise StoreError(f"{path}: record batch {index} has {decoded.num_rows} rows, manifest says {batch.rows}")
        return decoded

    def _read_table(self, shard: ShardInfo, batch_indices: Sequence[int] | None = None) -> pa.Table:
        """The shard's record batches (all, or ``batch_indices``), each verified against its checksum."""
        path = self.root / shard.file
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{path}: shard listed in the manifest is missing") from None
        try:
            size = os.fstat(fd).st_size
            if batch_indices is None:  # one sequential read of the whole file
                data = memoryview(_pread_all(fd, size, 0))
                schema = self._check_schema(path, data[: min(size, 1 << 16)].tobytes())
                if size != shard.bytes:
                    raise StoreError(f"{path}: unreadable or corrupted shard ({size} bytes, manifest says "
                                     f"{shard.bytes}: truncated or replaced)")
                chosen = list(enumerate(shard.batches))
                regions = [data[b.offset:b.offset + b.length] for _, b in chosen]
            else:
                stat = os.fstat(fd)  # a shard's schema is checked once per file identity
                key = ("schema", shard.file, stat.st_ino, stat.st_mtime_ns, size)
                if key not in self._cache:
                    self._cache[key] = self._check_schema(path, _pread_all(fd, min(size, 1 << 16), 0))
                schema = self._cache[key]
                if size != shard.bytes:
                    raise StoreError(f"{path}: unreadable or corrupted shard ({size} bytes, manifest says "
                                     f"{shard.bytes}: truncated or replaced)")
                chosen = [(i, shard.batches[i]) for i in batch_indices]
                regions = [_pread_all(fd, b.length, b.offset) for _, b in chosen]
        finally:
            os.close(fd)
        decode = lambda item: self._decode(path, schema, item[0][0], item[0][1], item[1])  # noqa: E731
        batches = list(_decoder_pool().map(decode, zip(chosen, regions)))  # CRC32 and Arrow decode release the GIL
        return pa.Table.from_batches(batches, schema=schema)

    def prefetch(self, shard: ShardInfo, batch_indices: Sequence[int] | None = None) -> None:
        """Queue the disk reads of a shard's record batches (all, or ``batch_indices``) without
        waiting for them; a later read finds them in the page cache."""
        try:
            fd = os.open(self.root / shard.file, os.O_RDONLY)
        except FileNotFoundError:
            return  # the read itself reports it
        try:
            if batch_indices is None:
                _advise(fd, 0, shard.bytes, "WILLNEED")
            for index in batch_indices or ():
                batch = shard.batches[index]
                _advise(fd, batch.offset, batch.length, "WILLNEED")
        finally:
            os.close(fd)

    def read_iteration(self, iteration: int) -> list[Trajectory]:
        """Every record of a published iteration, shard by shard in rank order."""
        return [record for _, _, records in self.iter_shards([iteration]) for record in records]

    def iter_shards(self, iterations: Iterable[int] | None = None, *, rank: int | None = None,
                    read_ahead_bytes: int = _READ_AHEAD_BYTES) -> Iterator[tuple[int, int, list[Trajectory]]]:
        """``(iteration, shard index, records)`` for every shard of ``iterations`` (default: every
        published one), in order; ``rank`` keeps only that writer rank's shards.

        For reading a store through (export, analysis, verification): the disk reads up to
        ``read_ahead_bytes`` of the following shards (at least one) while this one is checked
        and decoded, which roughly doubles the throughput of a cold read.
        """
        plan = [(iteration, index, shard) for iteration in (self.iterations() if iterations is None else iterations)
                for index, shard in enumerate(self.info(iteration).shards) if rank is None or shard.rank == rank]
        queued, queued_bytes = 0, 0  # shards whose read is queued; their bytes not yet consumed
        for position, (iteration, index, shard) in enumerate(plan):
            while queued < len(plan) and (queued <= position + 1
                                          or queued_bytes + plan[queued][2].bytes <= read_ahead_bytes):
                self.prefetch(plan[queued][2])
                queued_bytes += plan[queued][2].bytes
                queued += 1
            records = self.read_shard(iteration, index)
            queued_bytes -= shard.bytes
            yield iteration, index, records

    def read_shard(self, iteration: int, shard_index: int) -> list[Trajectory]:
        """Every record of one shard of a published iteration (one sequential read)."""
        shard = self.info(iteration).shards[shard_index]
        table = self._read_table(shard)
        if table.num_rows != shard.rows:
            raise StoreError(f"{self.root / shard.file}: {table.num_rows} rows, manifest says {shard.rows}")
        return self._records(shard, table)

    def group_ids(self, iteration: int) -> list[np.ndarray]:
        """The ``group_id`` of every row, per shard (from the manifest: no shard is read)."""
        return self._cached("group_ids", iteration, lambda: [np.asarray(shard.group_ids, dtype=np.int64)
                                                             for shard in self.info(iteration).shards])

    def _batches_of(self, iteration: int, shard_index: int, rows: Sequence[int]):
        shard = self.info(iteration).shards[shard_index]
        starts = np.cumsum([0] + [b.rows for b in shard.batches])
        rows_array = np.asarray(rows, dtype=np.int64)
        if rows_array.size and (rows_array.min() < 0 or rows_array.max() >= starts[-1]):
            raise StoreError(f"{self.root / shard.file}: rows {rows_array.min()}..{rows_array.max()} outside "
                             f"0..{starts[-1] - 1}")
        batch_of = np.searchsorted(starts, rows_array, side="right") - 1
        return shard, starts, rows_array, batch_of, sorted(set(batch_of.tolist()))

    def prefetch_rows(self, iteration: int, shard_index: int, rows: Sequence[int]) -> None:
        """Queue the disk reads ``read_rows(iteration, shard_index, rows)`` will need."""
        shard, _, _, _, needed = self._batches_of(iteration, shard_index, rows)
        self.prefetch(shard, needed)

    def read_rows(self, iteration: int, shard_index: int, rows: Sequence[int]) -> list[Trajectory]:
        """Records at ``rows`` of one shard, reading only the record batches that hold them."""
        shard, starts, rows_array, batch_of, needed = self._batches_of(iteration, shard_index, rows)
        table = self._read_table(shard, needed)
        offsets, position = {}, 0  # where each selected batch starts in ``table``
        for index in needed:
            offsets[index] = position
            position += int(starts[index + 1] - starts[index])
        local = [offsets[g] + int(r - starts[g]) for r, g in zip(rows_array.tolist(), batch_of.tolist())]
        return self._records(shard, table, local, rows_array.tolist())

    def _records(self, shard: ShardInfo, table: pa.Table, rows: Sequence[int] | None = None,
                 shard_rows: Sequence[int] | None = None) -> list[Trajectory]:
        """Decoded records (``rows`` of ``table``, which hold the shard's rows ``shard_rows``; default all),
        each group id checked against the manifest's (the sampler plans from those)."""
        try:
            records = from_table(table, self.extra_columns, rows=rows)
        except ValueError as error:
            raise StoreError(f"{self.root / shard.file}: invalid records ({error})") from None
        for row, record in zip(range(len(records)) if shard_rows is None else shard_rows, records):
            if row >= len(shard.group_ids) or record.group_id != shard.group_ids[row]:
                raise StoreError(f"{self.root / shard.file}: row {row} has group id {record.group_id}, the manifest "
                                 f"says {shard.group_ids[row] if row < len(shard.group_ids) else 'nothing'}")
        return records

    # retention ---------------------------------------------------------------------------
    def _remove(self, iterations: Iterable[int]) -> list[int]:
        removed = sorted(iterations)
        if not removed:
            return removed
        self._write_index({k: v for k, v in self._index().items() if k not in set(removed)})  # invisible first
        for iteration in removed:
            self.manifest_path(iteration).unlink(missing_ok=True)
            shutil.rmtree(self.iteration_dir(iteration), ignore_errors=True)
        fsync_dir(self.root / "manifests")
        return removed

    def prune(self, keep_last: int) -> list[int]:
        """Delete all but the newest ``keep_last`` published iterations; returns the deleted ones."""
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        published = self.iterations()
        return self._remove(published[:-keep_last])

    def truncate_after(self, iteration: int) -> list[int]:
        """Delete published iterations newer than ``iteration`` (resuming from an older checkpoint)."""
        return self._remove([k for k in self.iterations() if k > iteration])

    def _unpublished_dirs(self) -> tuple[list[Path], list[Path]]:
        """Iteration directories INDEX.json does not list: (remains outside the published range, ones inside it).

        Remains of an interrupted write lie after the last published iteration, those of an
        interrupted prune before the first; one inside the range lost its index entry.
        """
        published = self.iterations()
        outside, inside = [], []
        for path in sorted(self.root.iterdir()):
            match = _ITER.match(path.name)
            if match and int(match.group(1)) not in published:
                iteration = int(match.group(1))
                within = bool(published) and published[0] < iteration < published[-1]
                (inside if within else outside).append(path)
        return outside, inside

    def cleanup_partial(self) -> list[str]:
        """Delete temporary files, unlisted manifests and the iteration directories of interrupted writes and
        prunes; returns what was removed. A published iteration's missing manifest, or unlisted shards inside
        the published range, are a StoreError: they are never deleted."""
        missing = [self.manifest_path(k) for k in self.iterations() if not self.manifest_path(k).is_file()]
        outside, inside = self._unpublished_dirs()
        if missing or inside:
            raise StoreError(f"{self.root} was changed: {', '.join(map(str, missing + inside))} "
                             f"{'is' if len(missing + inside) == 1 else 'are'} missing or not in {_INDEX}; "
                             "nothing was deleted (run `remix-megatron store verify`, restore the files or start a "
                             "new store)")
        removed = []
        for path in sorted(self.root.rglob("*.tmp")):
            path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(self.root)))
        published = set(self.iterations())
        for iteration in self._manifest_files():
            if iteration not in published:  # written by a publish cut before its index entry
                self.manifest_path(iteration).unlink()
                removed.append(str(self.manifest_path(iteration).relative_to(self.root)))
        for path in outside:
            shutil.rmtree(path)
            removed.append(str(path.relative_to(self.root)))
        return removed

    def verify(self) -> list[str]:
        """Check the index against the manifests and read every published shard completely (every batch
        checksum, every row's consistency, every group id against the manifest); returns the problems found."""
        try:
            published = self.iterations()
        except StoreError as error:
            return [str(error)]
        problems = [f"{self.manifest_path(k)}: a manifest {_INDEX} does not list (an interrupted publish, or "
                    "copied in)" for k in self._manifest_files() if k not in published]
        problems += [f"{path}: shards of an iteration {_INDEX} does not list, inside the published range"
                     for path in self._unpublished_dirs()[1]]
        for iteration in published:
            try:
                for shard in self.info(iteration).shards:
                    table = self._read_table(shard)
                    self._records(shard, table)  # the rows' own consistency, group ids as in the manifest
                    rows = table.num_rows
                    if rows != shard.rows:
                        problems.append(f"{self.root / shard.file}: {rows} rows, manifest says {shard.rows}")
            except StoreError as error:
                problems.append(str(error))
        return problems


@functools.lru_cache(maxsize=1)
def _decoder_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="store-decode")


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """Exactly ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts, done = [], 0
    while done < length:
        part = os.pread(fd, length - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    return f"{values[0]}..{values[-1]} ({len(values)} iterations)"


def open_store(root: str | os.PathLike, *, extra_columns: Sequence[str] | None = None, create: bool = False,
               cleanup: bool = False, row_group_size: int = 16, compression: str = "zstd") -> TrajectoryStore:
    """Open (or with ``create=True`` create) a store.

    ``extra_columns`` must match the store's declared ones when given. ``cleanup=True``
    removes the remains of an interrupted write: call it from one rank before any writes.
    """
    root = Path(root)
    meta = root / "STORE.json"
    if not meta.is_file():
        if not create:
            raise StoreError(f"{root} is not a trajectory store (no STORE.json)")
        (root / "manifests").mkdir(parents=True, exist_ok=True)
        _atomic_write_json(root / _INDEX, {"iterations": {}})  # before STORE.json, which completes the store
        _atomic_write_json(meta, {"format": FORMAT, "layout_version": LAYOUT_VERSION, "schema_version": SCHEMA_VERSION,
                                  "extra_columns": list(extra_columns or ())})
    try:
        payload = json.loads(meta.read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"{meta}: corrupted ({error})") from None
    if payload.get("format") != FORMAT or payload.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{meta}: format {payload.get('format')!r} version {payload.get('schema_version')}; "
                         f"this code reads {FORMAT!r} version {SCHEMA_VERSION}")
    if payload.get("layout_version", 1) != LAYOUT_VERSION:
        raise StoreError(f"{meta}: layout version {payload.get('layout_version', 1)} (1 = Parquet shards, 2 = no "
                         f"{_INDEX}); this code reads layout {LAYOUT_VERSION}: write a new store")
    declared = tuple(payload["extra_columns"])
    if extra_columns is not None and tuple(extra_columns) != declared:
        raise StoreError(f"{root} declares extra columns {list(declared)}, asked for {list(extra_columns)}")
    (root / "manifests").mkdir(exist_ok=True)
    store = TrajectoryStore(root, declared, row_group_size, compression)
    if cleanup:
        store.cleanup_partial()
    return store
