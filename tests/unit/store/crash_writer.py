"""A writer process for the crash and concurrency tests: python -m tests.unit.store.crash_writer MODE ROOT.

shard:    publish iterations 0-2, then stream iteration 3's shard forever (the test kills it)
manifest: publish 0-2, write iteration 3's shards, then hang just before the manifest rename
append:   publish iterations 0..14 (two shards each) with pauses, then exit
"""

import os
import sys
import time

from remix_megatron.store import open_store
from remix_megatron.store import store as store_module
from tests.unit.store.helpers import make_records

PER_SHARD = 40


def publish(store, iteration):
    for rank in range(2):
        store.write_shard(iteration, rank, make_records(iteration, PER_SHARD, first_group=rank * PER_SHARD))
    store.publish(iteration, num_writers=2)


def main(mode: str, root: str) -> None:
    store = open_store(root, create=True, cleanup=True, row_group_size=8)
    if mode == "append":
        for iteration in range(15):
            publish(store, iteration)
            time.sleep(0.05)
        return
    for iteration in range(3):
        publish(store, iteration)
    if mode == "shard":
        with store.shard_writer(3, 0) as writer:
            while True:
                writer.write(make_records(3, 8))
                print("WRITING", flush=True)
                time.sleep(0.05)
    store.write_shard(3, 0, make_records(3, PER_SHARD))
    store.write_shard(3, 1, make_records(3, PER_SHARD, first_group=PER_SHARD))
    real_replace = os.replace

    def hang_before_manifest(src, dst):
        if str(dst).endswith("manifests/iter_00000003.json"):
            print("PUBLISHING", flush=True)
            time.sleep(120)
        real_replace(src, dst)

    store_module.os.replace = hang_before_manifest
    store.publish(3, num_writers=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
