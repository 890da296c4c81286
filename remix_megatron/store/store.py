"""A sharded on-disk trajectory store indexed by policy iteration.

Layout (one directory, local or shared filesystem)::

    STORE.json                      format, schema version, declared extra columns
    iter_00000012/shard_r00003.parquet   one shard per writer rank per iteration (zstd, page CRCs)
    manifests/iter_00000012.json    the iteration's index: shards, row counts, stats

An iteration is visible only once its manifest exists. Shards are written to a temporary
name, fsynced and renamed; the manifest is published the same way, after every shard of
the iteration is complete. So a crash (kill -9) at any point leaves every earlier iteration
readable and the partial one invisible; ``open_store(..., cleanup=True)`` (the publishing
rank, before the others write) deletes its remains. Nothing is pickled; nothing is skipped
silently: a schema mismatch or a corrupted shard raises ``StoreError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from remix_megatron.fileio import atomic_write_text, fsync_dir
from remix_megatron.store.record import SCHEMA_VERSION, Trajectory, arrow_schema, from_table, to_table

FORMAT = "remix-trajectory-store"
_ITER = re.compile(r"^iter_(\d{8})$")
_SHARD = re.compile(r"^shard_r(\d{5})\.parquet$")
_MANIFEST = re.compile(r"^iter_(\d{8})\.json$")


class StoreError(RuntimeError):
    """The store on disk is not what it must be (schema, corruption, missing data)."""


def _atomic_write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1))


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the store root
    rank: int
    rows: int
    bytes: int


@dataclass(frozen=True)
class IterationInfo:
    iteration: int
    rows: int
    bytes: int
    mean_reward: float
    mean_response_length: float
    shards: tuple[ShardInfo, ...]


class ShardWriter:
    """Streams records of one (iteration, rank) shard; the file appears complete or not at all."""

    def __init__(self, store: "TrajectoryStore", iteration: int, rank: int) -> None:
        self._store, self.iteration, self.rank = store, iteration, rank
        self.path = store.shard_path(iteration, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        # Dictionary encoding and statistics only where they pay: on random-looking token and
        # log-prob lists they cost 5x the write time (measured) and make files bigger.
        self._writer = pq.ParquetWriter(
            self._tmp, arrow_schema(store.extra_columns), compression="zstd", compression_level=1,
            write_page_checksum=True, use_dictionary=["prompt_id", "finish_reason"],
            write_statistics=["iteration", "group_id", "reward", "response_length"])
        self.rows = 0

    def write(self, records: Sequence[Trajectory]) -> None:
        for record in records:
            if record.iteration != self.iteration:
                raise ValueError(f"trajectory {record.prompt_id!r} of iteration {record.iteration} written to "
                                 f"iteration {self.iteration}")
        self._writer.write_table(to_table(records, self._store.extra_columns),
                                 row_group_size=self._store.row_group_size)
        self.rows += len(records)

    def commit(self) -> Path:
        self._writer.close()
        with open(self._tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self._writer.close()
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

    def __init__(self, root: Path, extra_columns: tuple[str, ...], row_group_size: int) -> None:
        self.root, self.extra_columns, self.row_group_size = root, extra_columns, row_group_size
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
        return self.iteration_dir(iteration) / f"shard_r{rank:05d}.parquet"

    def manifest_path(self, iteration: int) -> Path:
        return self.root / "manifests" / f"iter_{iteration:08d}.json"

    # index -------------------------------------------------------------------------------
    def iterations(self) -> list[int]:
        """Published iterations, ascending (re-read from disk on every call)."""
        return sorted(int(m.group(1)) for p in (self.root / "manifests").iterdir() if (m := _MANIFEST.match(p.name)))

    def is_published(self, iteration: int) -> bool:
        return self.manifest_path(iteration).is_file()

    def info(self, iteration: int) -> IterationInfo:
        return self._cached("info", iteration, lambda: self._read_manifest(iteration))

    def _read_manifest(self, iteration: int) -> IterationInfo:
        path = self.manifest_path(iteration)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"iteration {iteration} is not in the store {self.root} "
                             f"(published: {_ranges(self.iterations())})") from None
        except json.JSONDecodeError as error:
            raise StoreError(f"{path}: corrupted manifest ({error})") from None
        if payload.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {payload.get('schema_version')} but this code reads "
                             f"version {SCHEMA_VERSION}")
        shards = tuple(ShardInfo(**shard) for shard in payload["shards"])
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
        directory = self.iteration_dir(iteration)
        found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SHARD.match(p.name))) \
            if directory.is_dir() else []
        if found != list(range(num_writers)):
            raise StoreError(f"cannot publish iteration {iteration}: expected shards of ranks 0..{num_writers - 1}, "
                             f"found ranks {found} in {directory}")
        shards, rewards, lengths = [], [], []
        for rank in found:
            path = self.shard_path(iteration, rank)
            table = self._read_table(path, columns=["reward", "response_length"])
            shards.append(ShardInfo(file=str(path.relative_to(self.root)), rank=rank, rows=table.num_rows,
                                    bytes=path.stat().st_size))
            rewards.append(table.column("reward").to_numpy())
            lengths.append(table.column("response_length").to_numpy())
        reward, length = np.concatenate(rewards), np.concatenate(lengths)
        info = IterationInfo(iteration=iteration, rows=int(reward.size), bytes=sum(s.bytes for s in shards),
                             mean_reward=float(reward.mean()) if reward.size else 0.0,
                             mean_response_length=float(length.mean()) if length.size else 0.0, shards=tuple(shards))
        _atomic_write_json(self.manifest_path(iteration), {"schema_version": SCHEMA_VERSION, **asdict(info)})
        return info

    # reading -----------------------------------------------------------------------------
    def _parquet(self, path: Path) -> pq.ParquetFile:
        try:
            handle = pq.ParquetFile(path, page_checksum_verification=True)
        except FileNotFoundError:
            raise StoreError(f"{path}: shard listed in the manifest is missing") from None
        except (pa.ArrowException, OSError) as error:
            raise StoreError(f"{path}: unreadable or corrupted shard ({error})") from None
        metadata = handle.schema_arrow.metadata or {}
        version = metadata.get(b"remix.schema_version", b"?").decode()
        extra = json.loads(metadata.get(b"remix.extra_columns", b"null"))
        if version != str(SCHEMA_VERSION) or extra != list(self.extra_columns):
            raise StoreError(f"{path}: schema version {version} with extra columns {extra}; this store expects "
                             f"version {SCHEMA_VERSION} with {list(self.extra_columns)}")
        return handle

    def _read_table(self, path: Path, columns: list[str] | None = None, row_groups: list[int] | None = None,
                    handle: pq.ParquetFile | None = None) -> pa.Table:
        handle = handle or self._parquet(path)
        try:
            if row_groups is None:
                return handle.read(columns=columns)
            return handle.read_row_groups(row_groups, columns=columns)
        except (pa.ArrowException, OSError) as error:
            raise StoreError(f"{path}: unreadable or corrupted shard ({error})") from None

    def read_iteration(self, iteration: int) -> list[Trajectory]:
        """Every record of a published iteration, shard by shard in rank order."""
        records: list[Trajectory] = []
        for shard in self.info(iteration).shards:
            table = self._read_table(self.root / shard.file)
            if table.num_rows != shard.rows:
                raise StoreError(f"{self.root / shard.file}: {table.num_rows} rows, manifest says {shard.rows}")
            records += from_table(table, self.extra_columns)
        return records

    def group_ids(self, iteration: int) -> list[np.ndarray]:
        """The ``group_id`` column of each shard (reads that column only; cached)."""
        return self._cached("group_ids", iteration, lambda: self._read_group_ids(iteration))

    def _read_group_ids(self, iteration: int) -> list[np.ndarray]:
        info = self.info(iteration)
        out = []
        for shard in info.shards:
            column = self._read_table(self.root / shard.file, columns=["group_id"]).column("group_id").to_numpy()
            if column.size != shard.rows:
                raise StoreError(f"{self.root / shard.file}: {column.size} rows, manifest says {shard.rows}")
            out.append(column)
        return out

    def read_rows(self, iteration: int, shard_index: int, rows: Sequence[int]) -> list[Trajectory]:
        """Records at ``rows`` of one shard, reading only the row groups that hold them."""
        shard = self.info(iteration).shards[shard_index]
        path = self.root / shard.file
        handle = self._parquet(path)
        starts = np.cumsum([0] + [handle.metadata.row_group(i).num_rows for i in range(handle.num_row_groups)])
        rows_array = np.asarray(rows, dtype=np.int64)
        if rows_array.size and (rows_array.min() < 0 or rows_array.max() >= starts[-1]):
            raise StoreError(f"{path}: rows {rows_array.min()}..{rows_array.max()} outside 0..{starts[-1] - 1}")
        row_group_of = np.searchsorted(starts, rows_array, side="right") - 1
        groups = sorted(set(row_group_of.tolist()))
        table = self._read_table(path, row_groups=groups, handle=handle)
        offsets, position = {}, 0  # where each selected row group starts in ``table``
        for group in groups:
            offsets[group] = position
            position += int(starts[group + 1] - starts[group])
        local = [offsets[g] + int(r - starts[g]) for r, g in zip(rows_array.tolist(), row_group_of.tolist())]
        return from_table(table.take(pa.array(local, pa.int64())), self.extra_columns)

    # retention ---------------------------------------------------------------------------
    def _remove(self, iterations: Iterable[int]) -> list[int]:
        removed = []
        for iteration in iterations:
            self.manifest_path(iteration).unlink(missing_ok=True)  # invisible first, then delete
            fsync_dir(self.root / "manifests")
            shutil.rmtree(self.iteration_dir(iteration), ignore_errors=True)
            removed.append(iteration)
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

    def cleanup_partial(self) -> list[str]:
        """Delete temporary files and unpublished iteration directories; returns what was removed."""
        removed = []
        for path in sorted(self.root.rglob("*.tmp")):
            path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(self.root)))
        for path in sorted(self.root.iterdir()):
            match = _ITER.match(path.name)
            if match and not self.is_published(int(match.group(1))):
                shutil.rmtree(path)
                removed.append(str(path.relative_to(self.root)))
        return removed

    def verify(self) -> list[str]:
        """Read every published shard completely (page checksums on); returns the problems found."""
        problems = []
        for iteration in self.iterations():
            try:
                info = self.info(iteration)
                for shard in info.shards:
                    path = self.root / shard.file
                    table = self._read_table(path)
                    if table.num_rows != shard.rows or path.stat().st_size != shard.bytes:
                        problems.append(f"{path}: {table.num_rows} rows / {path.stat().st_size} bytes, manifest says "
                                        f"{shard.rows} / {shard.bytes}")
            except StoreError as error:
                problems.append(str(error))
        return problems


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    return f"{values[0]}..{values[-1]} ({len(values)} iterations)"


def open_store(root: str | os.PathLike, *, extra_columns: Sequence[str] | None = None, create: bool = False,
               cleanup: bool = False, row_group_size: int = 16) -> TrajectoryStore:
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
        _atomic_write_json(meta, {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                                  "extra_columns": list(extra_columns or ())})
    try:
        payload = json.loads(meta.read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"{meta}: corrupted ({error})") from None
    if payload.get("format") != FORMAT or payload.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{meta}: format {payload.get('format')!r} version {payload.get('schema_version')}; "
                         f"this code reads {FORMAT!r} version {SCHEMA_VERSION}")
    declared = tuple(payload["extra_columns"])
    if extra_columns is not None and tuple(extra_columns) != declared:
        raise StoreError(f"{root} declares extra columns {list(declared)}, asked for {list(extra_columns)}")
    (root / "manifests").mkdir(exist_ok=True)
    store = TrajectoryStore(root, declared, row_group_size)
    if cleanup:
        store.cleanup_partial()
    return store
