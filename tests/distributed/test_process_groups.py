"""Megatron gets our process groups explicitly; what still reads its globals is written down.

Every call into ``megatron.core.parallel_state`` made after ``init_parallel`` (building actor,
critic and a reference copy, DDP and the optimizer, a training step of each, forward passes,
TP/PP resharding, export and a checkpoint round trip) is traced on every rank. The readers
must be exactly ``compat.GLOBAL_PARALLEL_STATE_READERS``: before the groups were passed,
GPTModel, DDP, the optimizer, the schedules and sharded_state_dict each fetched their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from remix_megatron.compat import GLOBAL_PARALLEL_STATE_READERS
from tests.conftest import REPO

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tp2xpp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    "pp2_vpp2_distributed_optimizer": (2, ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=2",
                                           "parallel.virtual_pipeline=2", "parallel.use_distributed_optimizer=true"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_the_documented_readers_use_megatron_globals(tmp_path, layout):
    nproc, overrides = LAYOUTS[layout]
    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.distributed.groups_worker", str(out), *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    documented = {reader: sorted(names) for reader, (names, _why) in GLOBAL_PARALLEL_STATE_READERS.items()}
    for rank in range(nproc):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result["readers"] == documented, f"rank {rank}"
        assert all(result["same_groups"].values()), result["same_groups"]
