"""`remix-megatron store inspect | verify | prune` as a user runs them."""

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.unit.store.test_sampler import build_store

pytestmark = pytest.mark.unit


def cli(*args):
    return subprocess.run([sys.executable, "-m", "remix_megatron.cli", "store", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_inspect_verify_prune(tmp_path):
    store = build_store(tmp_path / "s", iterations=range(4), groups=6)
    store.write_shard(4, 0, [])  # an unpublished iteration
    out = cli("inspect", tmp_path / "s")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["iteration", "rows", "shards", "mean", "reward", "mean", "length", "on", "disk"]
    info = store.info(2)
    row = next(line.split() for line in lines if line.split()[0] == "2")
    assert row[1:4] == ["6", "2", f"{info.mean_reward:.4f}"]
    assert "unpublished (invisible" in out.stdout and "iter_00000004" in out.stdout
    assert cli("verify", tmp_path / "s").stdout.strip().endswith("4 iterations checked, 0 problems")
    pruned = cli("prune", tmp_path / "s", "--keep-last", 2)
    assert pruned.returncode == 0 and "removed 2 iterations: 0..1" in pruned.stdout
    assert store.iterations() == [2, 3]
    shard = store.shard_path(3, 0)
    shard.write_bytes(shard.read_bytes()[:50])
    bad = cli("verify", tmp_path / "s")
    assert bad.returncode == 1 and f"PROBLEM: {shard}" in bad.stdout
    missing = cli("inspect", tmp_path / "nowhere")
    assert missing.returncode == 1 and "is not a trajectory store" in missing.stderr
