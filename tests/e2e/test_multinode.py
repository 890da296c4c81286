"""Two "nodes" on loopback (two launch/multinode.sh calls, c10d rendezvous, 2 processes each)
train the tiny model at TP2 x DP2 and at PP2 x DP2 and log the same metrics as one 4-process
single-node run of the same layout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_dir():
    from remix_megatron.data.tiny import build_tiny_model

    return build_tiny_model()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


@pytest.mark.parametrize("layout", [("parallel.tensor_parallel=2", "parallel.pipeline_parallel=1"),
                                    ("parallel.tensor_parallel=1", "parallel.pipeline_parallel=2")],
                         ids=["tp2xdp2", "pp2xdp2"])
def test_two_nodes_match_one_node(tiny_dir, tmp_path, layout):
    def args(run: Path) -> list[str]:
        return ["train", "configs/tiny_remix_ppo.yaml", f"model.hf_path={tiny_dir}",
                f"data.train_path={tiny_dir}/train.jsonl", f"data.eval_path={tiny_dir}/heldout.jsonl",
                "rollout.prompts_per_step=32", "data.eval_size=32", "data.eval_interval=2", "trainer.num_steps=2",
                "trainer.save_interval=-1", *layout, f"trainer.run_dir={run}"]

    single, multi = tmp_path / "single", tmp_path / "multi"
    run_cli(args(single), nproc=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, "NNODES": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "2",
           "RDZV_ID": f"test-{os.getpid()}"}
    nodes = [subprocess.Popen(["bash", "launch/multinode.sh", *args(multi)], cwd=REPO, env={**env, "NODE_RANK": str(n)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=400))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-5000:]}"
    assert any("--nnodes=2 --node-rank=1" in err for _, err in outputs)  # the launcher printed its command
    a, b = records(single), records(multi)
    assert [r["iteration"] for r in a] == [0, 1, 2] and [r["iteration"] for r in b] == [0, 1, 2]
    # the ReMix batch, split over DP2: floor(0.6 * 32) = 19 fresh prompts per iteration, 13 replayed
    assert a[2]["replayed_groups"] == 13 and a[2]["rollouts_total"] == 2 * 19
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            assert rb[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (ra["iteration"], key)
