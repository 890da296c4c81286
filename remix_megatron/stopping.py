"""Stopping on a signal: SIGTERM/SIGUSR1 finish the iteration, checkpoint it, and stop."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class TrainingStopped(RuntimeError):
    """Training stopped early on a signal, after checkpointing its last complete iteration."""

    def __init__(self, signum: int, iteration: int, checkpointed: bool) -> None:
        self.signum, self.iteration, self.checkpointed = signum, iteration, checkpointed
        saved = ("its checkpoint is saved: resume with trainer.resume=true" if checkpointed
                 else "no checkpoint was saved (trainer.save_interval < 0)")
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; {saved}")


class StopRequest:
    """SIGTERM or SIGUSR1 (Slurm's preemption and time limit, torchrun's shutdown, ``kill``)
    asks the run to stop: the current iteration finishes, every rank agrees at its end, the
    checkpoint of that iteration is saved and ``train`` raises ``TrainingStopped``. Repeats
    while stopping are ignored: under Slurm a worker gets the signal twice, from Slurm (which
    signals every process of the step) and from torchrun (which forwards its own), and must
    still checkpoint. SIGINT (KeyboardInterrupt) or SIGKILL stop a worker at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            print(f"received {signal.Signals(signum).name} again: already stopping after this iteration", flush=True)
            return
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: finishing this iteration, then checkpointing and stopping",
              flush=True)

    def agreed(self) -> int | None:
        """The signal any rank received (all ranks call this at the same point), else None."""
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
