"""The trajectory record and its columnar (Arrow) form, with a versioned schema.

One record is one response to one prompt, produced by the policy of ``iteration``. Per-token
arrays (behaviour log-probs, values) have one entry per response token. Extra numeric
columns (e.g. a GRPO group advantage kept for replay) are declared when a store is created
and every record must carry exactly those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2  # 2: engine_logprobs
FINISH_REASONS = ("stop", "length", "abort")
EXTRA_PREFIX = "extra."


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One generated response and what training needs to replay it."""

    iteration: int  # policy version that generated it
    prompt_id: str
    group_id: int  # responses to the same prompt in one iteration share it (GRPO)
    prompt_tokens: np.ndarray  # int32 [prompt_len]
    response_tokens: np.ndarray  # int32 [response_len]
    reward: float
    behaviour_logprobs: np.ndarray  # float32 [response_len], the actor's recomputed log-probs
    finish_reason: str  # stop | length | abort
    values: np.ndarray | None = None  # float32 [response_len], critic values at collection (PPO)
    extra: Mapping[str, float] = field(default_factory=dict)
    # float32 [response_len]: the engine's own log-probs of the sampled tokens, when it gives them
    # (its numerics differ from the trainer's: dtype, kernels; see algorithms/mismatch.py)
    engine_logprobs: np.ndarray | None = None

    def __post_init__(self) -> None:
        as_array = lambda value, dtype: np.ascontiguousarray(value, dtype=dtype)  # noqa: E731
        object.__setattr__(self, "prompt_tokens", as_array(self.prompt_tokens, np.int32))
        object.__setattr__(self, "response_tokens", as_array(self.response_tokens, np.int32))
        object.__setattr__(self, "behaviour_logprobs", as_array(self.behaviour_logprobs, np.float32))
        for name in ("values", "engine_logprobs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_array(getattr(self, name), np.float32))
        n = self.response_tokens.size
        if self.iteration < 0:
            raise ValueError(f"trajectory {self.prompt_id!r}: iteration={self.iteration} must be >= 0")
        if self.behaviour_logprobs.size != n:
            raise ValueError(f"trajectory {self.prompt_id!r}: {self.behaviour_logprobs.size} behaviour log-probs "
                             f"for {n} response tokens")
        for name in ("values", "engine_logprobs"):
            array = getattr(self, name)
            if array is not None and array.size != n:
                raise ValueError(f"trajectory {self.prompt_id!r}: {array.size} {name} for {n} response tokens")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"trajectory {self.prompt_id!r}: finish_reason={self.finish_reason!r} is not one of "
                             f"{', '.join(FINISH_REASONS)}")

    @property
    def response_length(self) -> int:
        return int(self.response_tokens.size)

    def same_as(self, other: "Trajectory") -> bool:
        """Field-by-field equality (arrays compared exactly)."""
        arrays = ("prompt_tokens", "response_tokens", "behaviour_logprobs")
        scalars = ("iteration", "prompt_id", "group_id", "reward", "finish_reason")
        if any(getattr(self, n) != getattr(other, n) for n in scalars) or dict(self.extra) != dict(other.extra):
            return False
        for name in ("values", "engine_logprobs"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if (mine is None) != (theirs is None) or (mine is not None and not np.array_equal(mine, theirs)):
                return False
        return all(np.array_equal(getattr(self, n), getattr(other, n)) for n in arrays)


def arrow_schema(extra_columns: Sequence[str]) -> pa.Schema:
    fields = [
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_id", pa.int64(), nullable=False),
        pa.field("prompt_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("response_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("response_length", pa.int32(), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("values", pa.list_(pa.float32()), nullable=True),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("engine_logprobs", pa.list_(pa.float32()), nullable=True),
    ] + [pa.field(EXTRA_PREFIX + name, pa.float64(), nullable=False) for name in extra_columns]
    metadata = {"remix.schema_version": str(SCHEMA_VERSION), "remix.extra_columns": json.dumps(list(extra_columns))}
    return pa.schema(fields, metadata=metadata)


def _list_array(arrays: Sequence[np.ndarray], dtype: pa.DataType, np_dtype) -> pa.Array:
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np_dtype, copy=False) if arrays else np.zeros(0, np_dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=dtype))


def _optional_column(records: Sequence[Trajectory], name: str) -> pa.Array:
    """A per-token float column that every record of a shard has, or none (then all null)."""
    have = [getattr(r, name) is not None for r in records]
    if any(have) and not all(have):
        raise ValueError(f"either every trajectory of a shard carries {name} or none does")
    if all(have) and records:
        return _list_array([getattr(r, name) for r in records], pa.float32(), np.float32)
    return pa.nulls(len(records), pa.list_(pa.float32()))


def to_table(records: Sequence[Trajectory], extra_columns: Sequence[str]) -> pa.Table:
    """Records -> an Arrow table of ``arrow_schema(extra_columns)``."""
    expected = set(extra_columns)
    for record in records:
        if set(record.extra) != expected:
            raise ValueError(f"trajectory {record.prompt_id!r} has extra columns {sorted(record.extra)}; "
                             f"this store declares {sorted(expected)}")
    values, engine = (_optional_column(records, name) for name in ("values", "engine_logprobs"))
    columns = [
        pa.array([r.iteration for r in records], pa.int64()),
        pa.array([r.prompt_id for r in records], pa.string()),
        pa.array([r.group_id for r in records], pa.int64()),
        _list_array([r.prompt_tokens for r in records], pa.int32(), np.int32),
        _list_array([r.response_tokens for r in records], pa.int32(), np.int32),
        pa.array([r.response_length for r in records], pa.int32()),
        pa.array([r.reward for r in records], pa.float64()),
        _list_array([r.behaviour_logprobs for r in records], pa.float32(), np.float32),
        values,
        pa.array([r.finish_reason for r in records], pa.string()),
        engine,
    ] + [pa.array([r.extra[name] for r in records], pa.float64()) for name in extra_columns]
    return pa.Table.from_arrays(columns, schema=arrow_schema(extra_columns))


def _split(column: pa.ChunkedArray, np_dtype) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Per-row views of a list column, and the rows' lengths (-1 for a null row)."""
    out: list[np.ndarray | None] = []
    lengths = []
    for chunk in column.chunks:
        if chunk.null_count == len(chunk):
            out.extend([None] * len(chunk))
            lengths.append(np.full(len(chunk), -1))
            continue
        offsets = chunk.offsets.to_numpy()
        flat = chunk.values.to_numpy(zero_copy_only=False).astype(np_dtype, copy=False)
        out.extend(flat[offsets[i]:offsets[i + 1]] for i in range(len(chunk)))
        lengths.append(np.diff(offsets))
    return out, np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def _record(**fields) -> Trajectory:
    """A Trajectory whose fields ``from_table`` has already checked (column-wise, at once):
    ``__post_init__``'s per-record conversions and checks are skipped."""
    record = object.__new__(Trajectory)
    record.__dict__.update(fields)  # a frozen dataclass: its own __setattr__ refuses
    return record


def from_table(table: pa.Table, extra_columns: Sequence[str], rows: Sequence[int] | None = None) -> list[Trajectory]:
    """An Arrow table of the store's schema -> records (all, or those at ``rows``, in that order).

    Records of all rows share the table's buffers (zero-copy); records picked by ``rows`` own
    copies of their arrays, so the table's other rows are freed with it. What ``Trajectory``
    checks of one record is checked here for the whole table at once (array lengths, finish
    reasons, iterations); a violation is a ``ValueError``.
    """
    picked = range(table.num_rows) if rows is None else [int(i) for i in rows]
    own = (lambda a: a) if rows is None else (lambda a: None if a is None else a.copy())  # noqa: E731
    plain = {name: table.column(name).to_pylist() for name in ("iteration", "prompt_id", "group_id", "reward",
                                                                "finish_reason")}
    extras = {name: table.column(EXTRA_PREFIX + name).to_pylist() for name in extra_columns}
    prompts, _ = _split(table.column("prompt_tokens"), np.int32)
    responses, lengths = _split(table.column("response_tokens"), np.int32)
    logprobs, logprob_lengths = _split(table.column("behaviour_logprobs"), np.float32)
    values, value_lengths = _split(table.column("values"), np.float32)
    engine, engine_lengths = _split(table.column("engine_logprobs"), np.float32)
    stated = table.column("response_length").to_numpy()
    bad = ((logprob_lengths != lengths) | ((value_lengths != lengths) & (value_lengths != -1))
           | ((engine_lengths != lengths) & (engine_lengths != -1)) | (stated != lengths))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"row {row} ({plain['prompt_id'][row]!r}): {lengths[row]} response tokens, "
                         f"{logprob_lengths[row]} log-probs, {value_lengths[row]} values, response_length "
                         f"{stated[row]}")
    unknown = set(plain["finish_reason"]) - set(FINISH_REASONS)
    if unknown:
        raise ValueError(f"finish reasons {sorted(unknown)} are not among {', '.join(FINISH_REASONS)}")
    if min(plain["iteration"], default=0) < 0:
        raise ValueError(f"iteration {min(plain['iteration'])} < 0")
    return [_record(iteration=plain["iteration"][i], prompt_id=plain["prompt_id"][i], group_id=plain["group_id"][i],
                    prompt_tokens=own(prompts[i]), response_tokens=own(responses[i]), reward=plain["reward"][i],
                    behaviour_logprobs=own(logprobs[i]), finish_reason=plain["finish_reason"][i],
                    values=own(values[i]), extra={name: extras[name][i] for name in extra_columns},
                    engine_logprobs=own(engine[i]))
            for i in picked]
