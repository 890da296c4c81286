"""Aimed faults for the crash tests: a signal sent at a named point of the training loop.

``REMIX_FAULT=POINT@ITERATION:SIGNAL[:group]`` makes every process that reaches ``POINT`` at
``ITERATION`` send ``SIGNAL`` (a name such as KILL, TERM, USR1) to itself, or with ``group``
to its whole process group, as torchrun and Slurm do. A test then kills at an exact place
instead of racing a sleep. Points in the trainer: ``metrics_written`` (an iteration's record
is in metrics.jsonl) and ``checkpoint_saved`` (its checkpoint is complete and ``latest`` moved).
"""

from __future__ import annotations

import os
import signal

ENV = "REMIX_FAULT"


def fault_point(name: str, iteration: int) -> None:
    """Send the signal ``REMIX_FAULT`` asks for when it names this point and iteration; else nothing."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    where, _, action = spec.partition(":")
    if where != f"{name}@{iteration}":
        return
    signame, _, target = action.partition(":")
    signum = signal.Signals[f"SIG{signame.upper()}"]
    if target == "group":
        os.killpg(os.getpgid(0), signum)
    else:
        os.kill(os.getpid(), signum)
