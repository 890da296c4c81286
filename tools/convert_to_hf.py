#!/usr/bin/env python
r"""Export a remix-megatron checkpoint's actor (or critic) as a HuggingFace directory.

    python tools/convert_to_hf.py CHECKPOINT_ROOT --out DIR [--model critic] [--iteration N] [--dtype bf16]
    torchrun --nproc_per_node=4 tools/convert_to_hf.py ROOT --out DIR \
        parallel.tensor_parallel=2 parallel.pipeline_parallel=2

Same as `remix-megatron convert to-hf ...`.
"""

import sys

from remix_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "to-hf", *sys.argv[1:]]))
