"""StopRequest: a first SIGTERM/SIGUSR1 is recorded (training finishes its iteration), repeats
are ignored (under Slurm a worker hears the signal from Slurm and again from torchrun), and
leaving restores the old handlers."""

from __future__ import annotations

import signal

import pytest

from remix_megatron.stopping import StopRequest, TrainingStopped

pytestmark = pytest.mark.unit


def test_first_signal_is_recorded_repeats_ignored_handlers_restored(capsys):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    before = signal.getsignal(signal.SIGTERM)
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle and stop.agreed() is None
            signal.raise_signal(signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and stop.agreed() == signal.SIGTERM and seen == []
            signal.raise_signal(signal.SIGTERM)  # Slurm's copy after torchrun's: still stopping cleanly
            signal.raise_signal(signal.SIGUSR1)
            assert seen == [] and stop.signum == signal.SIGTERM
            assert signal.getsignal(signal.SIGTERM) == stop._handle == signal.getsignal(signal.SIGUSR1)
        assert capsys.readouterr().out.count("already stopping after this iteration") == 2
        assert signal.getsignal(signal.SIGTERM) == before
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_training_stopped_message():
    assert str(TrainingStopped(signal.SIGTERM, 7, True)) == ("stopped by SIGTERM after iteration 7; its checkpoint "
                                                             "is saved: resume with trainer.resume=true")
    assert "no checkpoint was saved" in str(TrainingStopped(signal.SIGUSR1, 3, False))
