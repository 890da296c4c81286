"""A store changed behind its writer's back: a deleted or edited manifest, an emptied
``manifests/``, a shard path leaving the store, a damaged schema header. ``store verify``, the
sampler and the next writer open each name the problem; nothing is read from outside the
store and no published iteration's shards are deleted."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from remix_megatron.store import MixedSampler, StoreError, open_store
from tests.unit.store.helpers import make_records

pytestmark = pytest.mark.unit


def published(tmp_path, count=4):
    store = open_store(tmp_path / "s", create=True)
    for k in range(count):
        store.write_shard(k, 0, make_records(k, 6))
        store.publish(k, 1)
    return store


def sample(store, iteration=3):
    """What training does at ``iteration``: replay from the window of the 2 iterations before it."""
    return MixedSampler(groups_per_step=6, window=2).sample(store, iteration, 0.5)


def reindex(store, iteration):
    """Tamper consistently: make INDEX.json agree with the (edited) manifest file."""
    index = json.loads((store.root / "INDEX.json").read_text())
    index["iterations"][str(iteration)] = hashlib.sha256(store.manifest_path(iteration).read_bytes()).hexdigest()
    (store.root / "INDEX.json").write_text(json.dumps(index))


def test_untouched_store_verifies_and_samples(tmp_path):
    store = published(tmp_path)
    assert store.verify() == [] and len(sample(store).trajectories) == 6


def test_a_deleted_middle_manifest_is_found_and_its_shards_kept(tmp_path):
    store = published(tmp_path)
    store.manifest_path(2).unlink()
    problems = store.verify()
    assert len(problems) == 1 and "iter_00000002.json is missing but" in problems[0]
    with pytest.raises(StoreError, match="iter_00000002.json is missing"):
        sample(store)  # replaying from iteration 2 (was: silently skipped, other data replayed)
    with pytest.raises(StoreError, match="was changed: .*iter_00000002.json.*nothing was deleted"):
        open_store(store.root, cleanup=True)  # the next writer (was: deleted iteration 2's shards)
    assert store.shard_path(2, 0).is_file()


def test_shards_without_an_index_entry_inside_the_range_are_never_deleted(tmp_path):
    store = published(tmp_path)
    index = json.loads((store.root / "INDEX.json").read_text())
    del index["iterations"]["1"]
    store.manifest_path(1).unlink()
    (store.root / "INDEX.json").write_text(json.dumps(index))
    assert any("iter_00000001: shards of an iteration INDEX.json does not list" in p for p in store.verify())
    with pytest.raises(StoreError, match="iter_00000001 is missing or not in INDEX.json"):
        open_store(store.root, cleanup=True)
    assert store.shard_path(1, 0).is_file()


def test_edited_group_ids_are_found(tmp_path):
    store = published(tmp_path)
    manifest = json.loads(store.manifest_path(2).read_text())
    manifest["shards"][0]["group_ids"] = [0, 0, 0, 1, 1, 1]  # six groups of one become two of three
    store.manifest_path(2).write_text(json.dumps(manifest, indent=1))
    assert any("iter_00000002.json: corrupted manifest (not the one published" in p for p in store.verify())
    with pytest.raises(StoreError, match="corrupted manifest"):
        sample(store)
    reindex(store, 2)  # index edited too: the shard's own group_id column still disagrees
    problems = store.verify()
    assert len(problems) == 1 and "shard_r00000.arrow: row 1 has group id 1, the manifest says 0" in problems[0]
    with pytest.raises(StoreError, match="group id"):
        sample(store, 2)  # iteration 2's fresh groups, as planned from the manifest


def test_an_emptied_manifests_directory_is_not_an_empty_store(tmp_path):
    store = published(tmp_path)
    for path in (store.root / "manifests").iterdir():
        path.unlink()
    problems = store.verify()  # was: "0 iterations checked, 0 problems"
    assert len(problems) == 4 and all("is missing but" in p for p in problems)
    with pytest.raises(StoreError, match="is missing"):
        sample(store)


def test_a_shard_path_outside_the_store_is_refused(tmp_path):
    store = published(tmp_path)
    outside = tmp_path / "x.arrow"
    shutil.copy(store.shard_path(2, 0), outside)  # a readable shard: only the path check stops it
    manifest = json.loads(store.manifest_path(2).read_text())
    manifest["shards"][0]["file"] = "../x.arrow"
    store.manifest_path(2).write_text(json.dumps(manifest, indent=1))
    reindex(store, 2)
    with pytest.raises(StoreError, match=r"shard entry 0 names '\.\./x\.arrow'.*expected 'iter_00000002/shard_r00000"):
        store.read_iteration(2)
    assert any("'../x.arrow'" in p for p in store.verify())


def test_every_damaged_schema_byte_is_a_store_error_naming_the_shard(tmp_path):
    store = published(tmp_path, count=1)
    shard = store.shard_path(0, 0)
    original = shard.read_bytes()
    schema_end = 16 + int.from_bytes(original[12:16], "little")
    caught = 0
    for position in range(8, schema_end):
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        shard.write_bytes(bytes(damaged))
        fresh = open_store(store.root)  # no cached schema
        try:
            fresh.read_iteration(0)
        except StoreError as error:  # was: OSError "Invalid flatbuffers message", no file named
            assert str(shard) in str(error)
            caught += 1
    assert caught > (schema_end - 8) // 2
    shard.write_bytes(original)
    assert open_store(store.root).verify() == []


def test_an_interrupted_publish_stays_invisible_and_is_cleaned(tmp_path):
    store = published(tmp_path, count=2)
    store.write_shard(2, 0, make_records(2, 6))
    (store.manifest_path(2)).write_text(store.manifest_path(1).read_text())  # written, index not yet updated
    assert store.iterations() == [0, 1] and not store.is_published(2)
    assert any("a manifest INDEX.json does not list" in p for p in store.verify())
    writer = open_store(store.root, cleanup=True)
    assert not store.manifest_path(2).exists() and not store.iteration_dir(2).exists() and writer.verify() == []
    writer.write_shard(2, 0, make_records(2, 6))
    writer.publish(2, 1)
    assert writer.iterations() == [0, 1, 2]
