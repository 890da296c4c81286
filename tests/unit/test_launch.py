"""Launch scripts translate torchrun / Slurm variables into one torchrun command line per node.

Stubs stand in for the interpreter (PYTHON), ``srun`` and ``scontrol``: each prints its command
line, and the stub srun runs its command once per fake node with that node's SLURM_NODEID, as
srun does with one task per node.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

MULTINODE, SBATCH = REPO / "launch" / "multinode.sh", REPO / "launch" / "slurm.sbatch"

STUB_PYTHON = '#!/usr/bin/env bash\necho "PYTHON $*"\n'
STUB_SCONTROL = '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 9\nprintf "%s\\n" $FAKE_HOSTS\n'
STUB_SRUN = """#!/usr/bin/env bash
echo "SRUN $*"
nodes=1
while [[ "$1" == -* ]]; do [[ "$1" == --nodes=* ]] && nodes="${1#--nodes=}"; shift; done
for (( node = 0; node < nodes; node++ )); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@"
done
"""


def torchrun(nnodes, node_rank, nproc, endpoint, rdzv_id, *cli) -> str:
    """The command line the launchers must produce, written out independently."""
    return (f"PYTHON -m torch.distributed.run --nnodes={nnodes} --node-rank={node_rank} --nproc-per-node={nproc} "
            f"--rdzv-backend=c10d --rdzv-endpoint={endpoint} --rdzv-id={rdzv_id} "
            f"--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m remix_megatron.cli {' '.join(cli)}")


@pytest.fixture
def stubs(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", STUB_PYTHON), ("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run(script: Path, args: list[str], env: dict, stubs: Path, *,
        without: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    for name in without:
        (stubs / name).unlink()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID")}
    full = {**clean, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python"), **env}
    return subprocess.run(["bash", str(script), *args], env=full, capture_output=True, text=True, timeout=60,
                          cwd=env.get("SLURM_SUBMIT_DIR", REPO))


def python_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("PYTHON ")]


@pytest.mark.parametrize("script", [MULTINODE, SBATCH], ids=lambda p: p.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_multinode_from_environment(stubs):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "1234", "NPROC_PER_NODE": "4",
           "RDZV_ID": "exp1"}
    result = run(MULTINODE, ["train", "configs/tiny_cpu.yaml", "trainer.num_steps=2"], env, stubs)
    assert result.returncode == 0, result.stderr
    expected = torchrun(2, 1, 4, "10.0.0.7:1234", "exp1", "train", "configs/tiny_cpu.yaml", "trainer.num_steps=2")
    assert python_lines(result) == [expected]
    assert f"node 1/2: {expected.replace('PYTHON', str(stubs / 'python'), 1)}" in result.stderr  # prints what it runs


def test_multinode_arguments_override_environment(stubs):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "NPROC_PER_NODE": "4"}
    args = ["--nnodes", "3", "--node-rank", "2", "--master-addr", "host0", "--master-port", "29999",
            "--nproc-per-node", "2", "--", "smoke", "configs/tiny_cpu.yaml"]
    result = run(MULTINODE, args, env, stubs)
    assert python_lines(result) == [torchrun(3, 2, 2, "host0:29999", "remix", "smoke", "configs/tiny_cpu.yaml")]


def test_multinode_defaults_and_slurm_node_rank(stubs):
    result = run(MULTINODE, ["train", "c.yaml"], {"SLURM_PROCID": "0"}, stubs)
    assert python_lines(result) == [torchrun(1, 0, "gpu", "127.0.0.1:29500", "remix", "train", "c.yaml")]
    env = {"NNODES": "4", "SLURM_NODEID": "3", "SLURM_PROCID": "1", "SLURM_JOB_ID": "77"}
    assert python_lines(run(MULTINODE, ["train", "c.yaml"], env, stubs)) == [
        torchrun(4, 3, "gpu", "127.0.0.1:29500", "77", "train", "c.yaml")]  # SLURM_NODEID before SLURM_PROCID
    env = {"NNODES": "4", "SLURM_PROCID": "2"}
    assert python_lines(run(MULTINODE, ["train", "c.yaml"], env, stubs))[0].startswith(
        "PYTHON -m torch.distributed.run --nnodes=4 --node-rank=2 ")


@pytest.mark.parametrize("args,env,message", [
    (["train", "c.yaml"], {"NNODES": "2", "NODE_RANK": "2"}, "node rank 2 is not below the node count 2"),
    (["--nodes", "2", "train"], {}, "unknown option --nodes"),
    (["--nnodes", "two", "train"], {}, "nnodes=two is not a non-negative integer"),
    (["--master-port"], {}, "--master-port needs a value"),
])
def test_multinode_rejects_bad_input(stubs, args, env, message):
    result = run(MULTINODE, args, env, stubs)
    assert result.returncode == 2 and message in result.stderr and not python_lines(result)


def slurm_env(tmp_path, **extra) -> dict:
    return {"SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
            "SLURM_JOB_NODELIST": "gpu-a[01-02]", "FAKE_HOSTS": "gpu-a01 gpu-a02", "SLURM_SUBMIT_DIR": str(REPO),
            "LOG_DIR": str(tmp_path / "logs"), "NODE_RANK": "5", **extra}  # a stray NODE_RANK must not win


def test_sbatch_one_torchrun_per_node(stubs, tmp_path):
    result = run(SBATCH, ["configs/scale_32b_remix_ppo.yaml", "trainer.resume=false", "trainer.num_steps=3"],
                 slurm_env(tmp_path), stubs)
    assert result.returncode == 0, result.stderr
    srun = [line for line in result.stdout.splitlines() if line.startswith("SRUN ")]
    assert len(srun) == 1
    assert f"--output={tmp_path / 'logs'}/%x-%j-%N.out" in srun[0].split() and "--nodes=2" in srun[0].split()
    cli = ("train", "configs/scale_32b_remix_ppo.yaml", "trainer.resume=false", "trainer.num_steps=3",
           "trainer.resume=true")  # resume is forced last, so a requeued job continues from `latest`
    assert python_lines(result) == [torchrun(2, node, 8, "gpu-a01:29623", "123", *cli) for node in (0, 1)]
    assert (tmp_path / "logs").is_dir()


def test_sbatch_fallbacks_without_scontrol(stubs, tmp_path):
    env = slurm_env(tmp_path, SLURM_NNODES="2", SLURM_GPUS_PER_NODE="h100:4", SLURM_JOB_NODELIST="nodeA,nodeB",
                    SLURM_JOB_ID="1999")
    del env["SLURM_JOB_NUM_NODES"], env["SLURM_GPUS_ON_NODE"]
    result = run(SBATCH, ["c.yaml"], env, stubs, without=("scontrol",))
    assert result.returncode == 0, result.stderr
    # port 29500 + 1999 % 1000
    assert python_lines(result) == [torchrun(2, n, 4, "nodeA:30499", "1999", "train", "c.yaml", "trainer.resume=true")
                                    for n in (0, 1)]


def test_sbatch_without_scontrol_refuses_a_compressed_node_list(stubs, tmp_path):
    result = run(SBATCH, ["c.yaml"], slurm_env(tmp_path), stubs, without=("scontrol",))
    assert result.returncode == 2 and "scontrol is needed to expand the node list gpu-a[01-02]" in result.stderr
    assert not python_lines(result)


def test_sbatch_needs_gpus_and_declares_requeue(stubs, tmp_path):
    env = slurm_env(tmp_path)
    del env["SLURM_GPUS_ON_NODE"]
    result = run(SBATCH, ["c.yaml"], env, stubs)
    assert result.returncode == 2 and "--gpus-per-node" in result.stderr and not python_lines(result)
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives and "#SBATCH --ntasks-per-node=1" in directives
    assert "#SBATCH --mem=0" in directives  # --exclusive alone need not give the node's memory
    assert "pkill" not in SBATCH.read_text() + MULTINODE.read_text()
