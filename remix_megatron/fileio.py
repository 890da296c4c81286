"""Crash-safe small-file writes shared by configs, the trajectory store and checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing other threads' file creations)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync, rename over ``path``, fsync the directory.

    Readers see the old file or the new one, never a partial one, even after a crash.
    ``durable=False`` skips both fsyncs: still atomic for readers and after a process kill,
    for files whose loss in a machine crash is harmless (a later durable write supersedes them).
    """
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the run from its group
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(f.name, path)
    if durable:
        fsync_dir(path.parent)
    return path
