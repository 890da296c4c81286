#!/usr/bin/env bash
# Multi-node launch: one call per node; torchrun's c10d rendezvous joins the nodes and every
# rank runs the same remix-megatron command line.
#
#   launch/multinode.sh [--nnodes N] [--node-rank R] [--master-addr HOST] [--master-port PORT]
#                       [--nproc-per-node P] [--] COMMAND CONFIG [key=value ...]
#
# Each option falls back to its environment variable: NNODES (default 1), NODE_RANK (else
# SLURM_NODEID, else SLURM_PROCID, else 0), MASTER_ADDR (default 127.0.0.1), MASTER_PORT
# (default 29500), NPROC_PER_NODE (default "gpu": one process per visible GPU). RDZV_ID names
# the rendezvous (default: SLURM_JOB_ID, else "remix"); PYTHON the interpreter (default: the
# repository's .venv). torchrun forwards SIGUSR1 to the workers like SIGTERM (by default it
# would die of it). Example, two nodes with 8 GPUs each, run on each node:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=node01 NPROC_PER_NODE=8 \
#       launch/multinode.sh train configs/scale_32b_remix_ppo.yaml model.hf_path=/path/to/hf
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}"
master_addr="${MASTER_ADDR:-127.0.0.1}"
master_port="${MASTER_PORT:-29500}"
nproc_per_node="${NPROC_PER_NODE:-gpu}"
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-remix}}"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
value() { [[ $# -ge 2 && -n "$2" ]] || { echo "multinode.sh: $1 needs a value" >&2; exit 2; }; echo "$2"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) nnodes="$(value "$@")"; shift 2 ;;
        --node-rank) node_rank="$(value "$@")"; shift 2 ;;
        --master-addr) master_addr="$(value "$@")"; shift 2 ;;
        --master-port) master_port="$(value "$@")"; shift 2 ;;
        --nproc-per-node) nproc_per_node="$(value "$@")"; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "multinode.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
for name in nnodes node_rank master_port; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || { echo "multinode.sh: $name=${!name} is not a non-negative integer" >&2; exit 2; }
done
(( node_rank < nnodes )) || { echo "multinode.sh: node rank $node_rank is not below the node count $nnodes" >&2; exit 2; }

cmd=("$python" -m torch.distributed.run --nnodes="$nnodes" --node-rank="$node_rank"
     --nproc-per-node="$nproc_per_node" --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port"
     --rdzv-id="$rdzv_id" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m remix_megatron.cli "$@")
echo "node $node_rank/$nnodes: ${cmd[*]}" >&2
exec "${cmd[@]}"
