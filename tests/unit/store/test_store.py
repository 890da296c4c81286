"""The store: round trips, publication, retention, selective reads, corruption and schema errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from remix_megatron.store import SCHEMA_VERSION, StoreError, Trajectory, open_store
from tests.unit.store.helpers import make_records, same_records

pytestmark = pytest.mark.unit


def test_round_trip_every_field(tmp_path):
    store = open_store(tmp_path / "s", create=True, extra_columns=["grpo_advantage"])
    records = make_records(3, 50, group_size=5, extra=("grpo_advantage",))
    store.write_shard(3, 0, records[:20])
    store.write_shard(3, 1, records[20:])
    info = store.publish(3, num_writers=2)
    assert same_records(store.read_iteration(3), records)
    assert info.rows == 50 and [s.rows for s in info.shards] == [20, 30]
    assert info.mean_reward == pytest.approx(np.mean([r.reward for r in records]))
    assert info.mean_response_length == pytest.approx(np.mean([r.response_length for r in records]))
    assert same_records(store.read_shard(3, 1), records[20:])
    reopened = open_store(tmp_path / "s")
    assert reopened.extra_columns == ("grpo_advantage",) and reopened.iterations() == [3]


def test_engine_logprobs_round_trip_beside_the_behaviour_ones(tmp_path):
    """The engine's sampling log-probs are stored per token beside the trainer's (or not at all)."""
    from dataclasses import replace

    store = open_store(tmp_path / "s", create=True)
    records = make_records(1, 12)
    with_engine = [replace(r, engine_logprobs=r.behaviour_logprobs - 0.25) for r in records]
    store.write_shard(1, 0, with_engine)
    store.write_shard(1, 1, records)  # an engine without log-probs: the column is null
    store.publish(1, num_writers=2)
    back = store.read_shard(1, 0)
    assert same_records(back, with_engine) and not same_records(back, records)
    for record in back:
        np.testing.assert_array_equal(record.engine_logprobs, record.behaviour_logprobs - 0.25)
    assert all(r.engine_logprobs is None for r in store.read_shard(1, 1))
    with pytest.raises(ValueError, match="every trajectory of a shard carries engine_logprobs or none"):
        open_store(tmp_path / "o", create=True).write_shard(1, 0, with_engine[:3] + records[3:])


def test_page_cache_hints(tmp_path, monkeypatch):
    """Writers start the write-back of every ~1 MiB written; readers queue a shard's reads first."""
    from remix_megatron.store import store as store_module

    calls = []
    monkeypatch.setattr(store_module.os, "posix_fadvise",
                        lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    monkeypatch.setattr(store_module, "_WRITEBACK_BYTES", 4 << 10)
    store = open_store(tmp_path / "s", create=True, row_group_size=4)
    records = make_records(0, 64)
    store.write_shard(0, 0, records)
    shard = store.publish(0, 1).shards[0]
    written = [(o, n) for o, n, a in calls if a == store_module.os.POSIX_FADV_DONTNEED]
    assert len(written) >= 2 and written[0][0] == 0  # contiguous ranges from the start of the file
    assert all(a + n == b for (a, n), (b, _) in zip(written, written[1:]))
    assert shard.bytes - (written[-1][0] + written[-1][1]) < (4 << 10) + shard.batches[-1].length + 4096
    calls.clear()
    assert same_records(store.read_iteration(0), records)
    assert calls[0] == (0, shard.bytes, store_module.os.POSIX_FADV_WILLNEED)
    calls.clear()
    store.prefetch_rows(0, 0, [5, 6])  # what the sampler does before its read_rows calls
    assert calls == [(shard.batches[1].offset, shard.batches[1].length, store_module.os.POSIX_FADV_WILLNEED)]


def test_records_without_values_and_empty_responses(tmp_path):
    store = open_store(tmp_path / "s", create=True)
    records = make_records(0, 30, with_values=False)
    assert any(r.response_length == 0 for r in records)
    store.write_shard(0, 0, records)
    store.publish(0, 1)
    back = store.read_iteration(0)
    assert same_records(back, records) and all(r.values is None for r in back)


def test_record_validation():
    good = dict(iteration=0, prompt_id="p", group_id=0, prompt_tokens=[1], response_tokens=[1, 2], reward=1.0,
                behaviour_logprobs=[-1.0, -2.0], finish_reason="stop")
    Trajectory(**good)
    with pytest.raises(ValueError, match="1 behaviour log-probs for 2 response tokens"):
        Trajectory(**{**good, "behaviour_logprobs": [-1.0]})
    with pytest.raises(ValueError, match="3 values for 2 response tokens"):
        Trajectory(**good, values=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="1 engine_logprobs for 2 response tokens"):
        Trajectory(**good, engine_logprobs=[-1.0])
    with pytest.raises(ValueError, match="finish_reason='eos'"):
        Trajectory(**{**good, "finish_reason": "eos"})


def test_extra_columns_must_match_the_store(tmp_path):
    store = open_store(tmp_path / "s", create=True, extra_columns=["a"])
    with pytest.raises(ValueError, match="declares \\['a'\\]"):
        store.write_shard(0, 0, make_records(0, 2, extra=("b",)))
    with pytest.raises(StoreError, match="declares extra columns \\['a'\\], asked for \\['b'\\]"):
        open_store(tmp_path / "s", extra_columns=["b"])


def test_publication_rules(tmp_path):
    store = open_store(tmp_path / "s", create=True)
    store.write_shard(0, 0, make_records(0, 4))
    assert store.iterations() == []  # not visible before its manifest
    with pytest.raises(StoreError, match="expected shards of ranks 0..1, found ranks \\[0\\]"):
        store.publish(0, num_writers=2)
    store.publish(0, num_writers=1)
    with pytest.raises(StoreError, match="already published"):
        store.write_shard(0, 1, make_records(0, 4))
    with pytest.raises(ValueError, match="of iteration 1 written to iteration 2"):
        store.write_shard(2, 0, make_records(1, 2))
    with pytest.raises(StoreError, match="iteration 7 is not in the store"):
        store.read_iteration(7)


def test_prune_truncate_and_partial_cleanup(tmp_path):
    store = open_store(tmp_path / "s", create=True)
    for k in range(6):
        store.write_shard(k, 0, make_records(k, 3))
        store.publish(k, 1)
    store.write_shard(6, 0, make_records(6, 3))  # partial: never published
    (store.iteration_dir(7)).mkdir()
    (store.iteration_dir(7) / "shard_r00000.arrow.123.tmp").write_bytes(b"half a shard")
    assert store.prune(keep_last=3) == [0, 1, 2]
    assert store.iterations() == [3, 4, 5] and not store.iteration_dir(0).exists()
    assert store.iteration_dir(6).exists()  # prune never touches an unpublished iteration
    assert store.truncate_after(4) == [5]
    reader = open_store(tmp_path / "s")  # a reader leaves the partial remains alone
    assert reader.iterations() == [3, 4] and store.iteration_dir(6).exists()
    writer = open_store(tmp_path / "s", cleanup=True)
    assert not store.iteration_dir(6).exists() and not store.iteration_dir(7).exists()
    assert same_records(writer.read_iteration(4), make_records(4, 3))


def test_read_rows_touches_only_needed_batches(tmp_path, monkeypatch):
    from remix_megatron.store import store as store_module

    store = open_store(tmp_path / "s", create=True, row_group_size=4)
    records = make_records(0, 40)
    store.write_shard(0, 0, records)
    store.publish(0, 1)
    decoded, read = [], []
    original_decode, original_pread = store_module.TrajectoryStore._decode, store_module._pread_all
    monkeypatch.setattr(store_module.TrajectoryStore, "_decode",
                        lambda self, path, schema, index, *a: decoded.append(index) or original_decode(
                            self, path, schema, index, *a))
    monkeypatch.setattr(store_module, "_pread_all",
                        lambda fd, length, offset: read.append(length) or original_pread(fd, length, offset))
    rows = [37, 1, 9, 2]
    picked = store.read_rows(0, 0, rows)
    assert same_records(picked, [records[r] for r in rows])
    assert sorted(decoded) == [0, 2, 9]  # rows 1-2 in batch 0, 9 in batch 2, 37 in batch 9 (4 rows each)
    assert all(r.response_tokens.flags.owndata and r.values.flags.owndata for r in picked)  # batches can be freed
    shard = store.info(0).shards[0]
    head = min(shard.bytes, 1 << 16)  # the schema check, once per shard file
    assert sum(read) == head + sum(shard.batches[i].length for i in (0, 2, 9)) < shard.bytes + head
    read.clear()
    store.read_rows(0, 0, [38])
    assert read == [shard.batches[9].length]  # the schema is not read again
    with pytest.raises(StoreError, match="outside 0..39"):
        store.read_rows(0, 0, [40])


def test_shards_are_plain_arrow_ipc_with_checksummed_batches(tmp_path):
    import zlib

    import pyarrow as pa

    store = open_store(tmp_path / "s", create=True, row_group_size=8)
    records = make_records(2, 20)
    store.write_shard(2, 0, records)
    info = store.publish(2, 1)
    shard = info.shards[0]
    assert [b.rows for b in shard.batches] == [8, 8, 4] and list(shard.group_ids) == [r.group_id for r in records]
    data = store.shard_path(2, 0).read_bytes()
    assert [zlib.crc32(data[b.offset:b.offset + b.length]) for b in shard.batches] == [b.crc32 for b in shard.batches]
    table = pa.ipc.open_file(store.shard_path(2, 0)).read_all()  # any Arrow reader opens a shard
    assert table.num_rows == 20 and table.column("prompt_id").to_pylist() == [r.prompt_id for r in records]


def test_a_flipped_bit_in_any_batch_is_caught(tmp_path):
    store = open_store(tmp_path / "s", create=True, row_group_size=4)
    store.write_shard(0, 0, make_records(0, 12))
    shard = store.publish(0, 1).shards[0]
    path = store.shard_path(0, 0)
    clean = path.read_bytes()
    for index, batch in enumerate(shard.batches):
        data = bytearray(clean)
        data[batch.offset + batch.length - 3] ^= 0x01  # the body's last bytes: a silent value change
        path.write_bytes(bytes(data))
        with pytest.raises(StoreError, match=f"record batch {index}.*checksum mismatch"):
            store.read_iteration(0)
        with pytest.raises(StoreError, match=f"record batch {index}.*checksum mismatch"):
            store.read_rows(0, 0, [4 * index])
    path.write_bytes(clean)
    assert store.verify() == []


def _published(tmp_path):
    store = open_store(tmp_path / "s", create=True)
    store.write_shard(0, 0, make_records(0, 30))
    store.publish(0, 1)
    return store, store.shard_path(0, 0)


def test_corrupted_shard_is_named(tmp_path):
    store, shard = _published(tmp_path)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{shard}: unreadable or corrupted"):
        store.read_iteration(0)
    assert any(str(shard) in problem for problem in store.verify())


def test_truncated_and_missing_shards_are_named(tmp_path):
    store, shard = _published(tmp_path)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match=f"{shard}: unreadable or corrupted"):
        store.read_iteration(0)
    shard.unlink()
    with pytest.raises(StoreError, match=f"{shard}: shard listed in the manifest is missing"):
        store.read_iteration(0)


def test_schema_mismatch_and_bad_manifest_are_named(tmp_path):
    store, shard = _published(tmp_path)
    other = open_store(tmp_path / "other", create=True, extra_columns=["x"])
    other.write_shard(0, 0, make_records(0, 3, extra=("x",)))
    shard.write_bytes(other.shard_path(0, 0).read_bytes())
    with pytest.raises(StoreError, match=f"{shard}: schema version {SCHEMA_VERSION} with extra columns \\['x'\\]"):
        store.read_iteration(0)
    store.manifest_path(0).write_text("{not json")
    with pytest.raises(StoreError, match="corrupted manifest"):
        store.info(0)
    text = json.dumps({"schema_version": 99})  # a manifest of another code version, consistently indexed
    store.manifest_path(0).write_text(text)
    (store.root / "INDEX.json").write_text(json.dumps({"iterations": {"0": hashlib.sha256(text.encode()).hexdigest()}}))
    with pytest.raises(StoreError, match="schema version 99"):
        store.info(0)
    with pytest.raises(StoreError, match="is not a trajectory store"):
        open_store(tmp_path / "nowhere")


def test_records_read_back_have_the_types_trajectory_gives(tmp_path):
    store, _ = _published(tmp_path)
    for record in store.read_iteration(0) + store.read_rows(0, 0, [4, 2]):
        assert isinstance(record, Trajectory) and record.response_length == record.response_tokens.size
        assert record.prompt_tokens.dtype == record.response_tokens.dtype == np.int32
        assert record.behaviour_logprobs.dtype == record.values.dtype == np.float32
        with pytest.raises(AttributeError):
            record.reward = 2.0  # still frozen


def test_inconsistent_rows_with_valid_checksums_are_named(tmp_path, monkeypatch):
    """What Trajectory checks per record is checked per table on read: a shard written by other
    code with a log-prob list one short (or an unknown finish reason) is an error naming it."""
    import pyarrow as pa

    import remix_megatron.store.store as store_module
    from remix_megatron.store.record import to_table

    def short_logprobs(records, extra):
        table = to_table(records, extra)
        column = table.column("behaviour_logprobs").to_pylist()
        column[2] = column[2][:-1]
        return table.set_column(table.schema.get_field_index("behaviour_logprobs"), table.schema.field(
            "behaviour_logprobs"), pa.array(column, pa.list_(pa.float32())))

    def bad_reason(records, extra):
        table = to_table(records, extra)
        index = table.schema.get_field_index("finish_reason")
        return table.set_column(index, table.schema.field(index), pa.array(["eos"] * table.num_rows))

    store = open_store(tmp_path / "s", create=True)
    records = [r for r in make_records(0, 8) if r.response_length > 1]
    for iteration, corrupt, message in ((0, short_logprobs, "row 2 .* log-probs"), (1, bad_reason, "'eos'")):
        monkeypatch.setattr(store_module, "to_table", corrupt)
        store.write_shard(iteration, 0, [Trajectory(**{**r.__dict__, "iteration": iteration}) for r in records])
        store.publish(iteration, 1)
        monkeypatch.undo()
        shard = store.shard_path(iteration, 0)
        with pytest.raises(StoreError, match=f"{shard}: invalid records .*{message}"):
            store.read_iteration(iteration)
        with pytest.raises(StoreError, match=f"{shard}: invalid records"):
            store.read_rows(iteration, 0, [0])
        assert any(problem.startswith(f"{shard}: invalid records") for problem in store.verify())


def test_iter_shards_reads_ahead_in_order(tmp_path, monkeypatch):
    store = open_store(tmp_path / "s", create=True)
    written = {}
    for iteration in (2, 3, 5):
        for rank in (0, 1):
            written[iteration, rank] = make_records(iteration, 6, first_group=10 * rank)
            store.write_shard(iteration, rank, written[iteration, rank])
        store.publish(iteration, 2)
    events = []
    prefetch, read_shard = store.prefetch, store.read_shard
    monkeypatch.setattr(store, "prefetch",
                        lambda shard, *a: events.append(("prefetch", shard.file)) or prefetch(shard, *a))
    monkeypatch.setattr(store, "read_shard", lambda k, i: events.append(("read", store.info(k).shards[i].file))
                        or read_shard(k, i))
    got = list(store.iter_shards(rank=1, read_ahead_bytes=0))
    assert [(k, i) for k, i, _ in got] == [(2, 1), (3, 1), (5, 1)]
    assert all(same_records(records, written[k, 1]) for k, _, records in got)
    files = [store.info(k).shards[1].file for k in (2, 3, 5)]
    # with no byte budget the disk still reads one shard ahead of decoding
    assert events == [("prefetch", files[0]), ("prefetch", files[1]), ("read", files[0]), ("prefetch", files[2]),
                      ("read", files[1]), ("read", files[2])]
    events.clear()
    everything = list(store.iter_shards([5, 2]))
    assert [(k, i) for k, i, _ in everything] == [(5, 0), (5, 1), (2, 0), (2, 1)]
    assert [e for e, _ in events[:4]] == ["prefetch"] * 4  # all four fit the default budget: queued up front
    assert same_records(store.read_iteration(3), written[3, 0] + written[3, 1])
