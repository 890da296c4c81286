#!/usr/bin/env python
"""Run a sweep (a YAML grid over config keys) and aggregate its runs into a table and a plot.

    python tools/sweep.py configs/sweeps/offpolicy_portion.yaml [key=value ...] [--dry-run] [--slurm] [--aggregate-only]

Same as `remix-megatron sweep ...` (see remix_megatron/sweep.py for the file format).
"""

import sys

from remix_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
