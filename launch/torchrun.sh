#!/usr/bin/env bash
# Single-node launch: every local rank runs the same remix-megatron command line.
#   NPROC_PER_NODE=4 launch/torchrun.sh smoke configs/tiny_cpu.yaml [key=value ...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="${NPROC_PER_NODE:-4}" \
    -m remix_megatron.cli "$@"
