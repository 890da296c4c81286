"""Forward passes the loop skips (pi_k on fresh rows, pi_{k-1} on age-1 rows, the critic on fresh
rows) give what running them gives, at TP1 and across a pipeline (real models, torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("nproc,pp", [(1, 1), (2, 2)])
def test_reused_results_equal_computed_ones(tmp_path, nproc, pp):
    from remix_megatron.data.tiny import build_tiny_model

    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.distributed.forwards_worker", str(build_tiny_model()), str(out),
           f"parallel.pipeline_parallel={pp}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(nproc):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        for name, gap in result["max_gap"].items():
            assert gap < 1e-5, (name, result)  # reused == recomputed, on every token of the loss
        assert result["outside_mask"] == 0.0
        assert result["centre_gap"] < 1e-5, result  # the value clip is centred on the current critic
        assert result["age2_differs"] > 0.1  # age-2 rows were recomputed, not copied from their behaviour
        # 32 rows (30 real) x 3 actor-side passes in full; reused: pi_k on 20 replayed rows, ref on
        # all 30, pi_{k-1} on 20 (fresh + age 2), each padded to micro-batches of 4.
        assert result["rows_full"] == 3 * 32 and result["rows_reused"] == 20 + 32 + 20, result
