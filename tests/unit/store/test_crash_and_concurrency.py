"""A real writer process killed with SIGKILL mid-shard and mid-manifest; a reader racing a writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from remix_megatron.store import open_store
from tests.conftest import REPO
from tests.unit.store.crash_writer import PER_SHARD
from tests.unit.store.helpers import make_records, same_records

pytestmark = pytest.mark.unit


def start_writer(mode: str, root) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.unit.store.crash_writer", mode, str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, marker: str) -> None:
    for line in process.stdout:
        if line.strip() == marker:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            return
    raise AssertionError(f"writer exited before {marker}: {process.stderr.read()[-3000:]}")


def expected(iteration):
    return make_records(iteration, PER_SHARD) + make_records(iteration, PER_SHARD, first_group=PER_SHARD)


@pytest.mark.parametrize(("mode", "marker"), [("shard", "WRITING"), ("manifest", "PUBLISHING")])
def test_sigkill_leaves_earlier_iterations_intact(tmp_path, mode, marker):
    root = tmp_path / "store"
    kill_when(start_writer(mode, root), marker)
    leftovers = list(root.rglob("*.tmp"))
    assert leftovers, "the kill should have left a temporary file behind"
    reader = open_store(root)  # a reader sees only complete iterations and deletes nothing
    assert reader.iterations() == [0, 1, 2]
    assert all(path.exists() for path in leftovers)
    writer = open_store(root, cleanup=True)  # the next writer cleans up
    assert not list(root.rglob("*.tmp")) and not writer.iteration_dir(3).exists()
    for iteration in range(3):
        assert same_records(writer.read_iteration(iteration), expected(iteration))
    assert writer.verify() == []
    writer.write_shard(3, 0, make_records(3, 5))  # and writing goes on
    writer.publish(3, 1)
    assert writer.iterations() == [0, 1, 2, 3]


def test_reader_never_sees_a_partial_iteration(tmp_path):
    root = tmp_path / "store"
    writer = start_writer("append", root)
    seen = set()
    try:
        while writer.poll() is None or len(seen) < 15:
            if not (root / "STORE.json").exists():
                continue
            store = open_store(root)
            for iteration in store.iterations():
                records = store.read_iteration(iteration)
                assert len(records) == store.info(iteration).rows == 2 * PER_SHARD
                if iteration not in seen:
                    assert same_records(records, expected(iteration))
                    seen.add(iteration)
            if writer.poll() is not None and writer.returncode != 0:
                raise AssertionError(writer.stderr.read()[-3000:])
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGKILL)
    assert seen == set(range(15))
