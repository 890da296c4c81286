#!/usr/bin/env python
"""Evaluate an HF directory or a training checkpoint on the math benchmarks (pass@1, avg@k).

Same as ``remix-megatron evaluate``; run under torchrun for data parallelism:
    python tools/evaluate.py --model DIR --out results/ [--benchmarks aime24,math500] [--limit 50]
    torchrun --nproc_per_node=4 tools/evaluate.py --checkpoint runs/x/checkpoints --out results/
"""

import sys

from remix_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
