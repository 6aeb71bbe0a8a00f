"""One medfed process per run folder: an exclusive lock on ``RUN_DIR/.lock``.

Two ``medfed simulate --resume`` (or ``medfed server``) on one run folder both ran: their
records interleaved in ``metrics.jsonl`` (three "start" lines, rounds twice, two "end"
lines) and both wrote the checkpoint. The process that runs a study (``medfed simulate``
with either engine, ``medfed server``) therefore holds :func:`run_folder_lock` from before
it writes anything in the folder to its end, and a second one stops with one line.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on an open file: the kernel releases it when the
holder exits however it ends (SIGKILL, a crash), so a killed run never leaves a stale lock.
The file stays (removing it would let a third process lock a new file while a second
holds the old one); it holds the pid of the last holder, for the message. Its descriptor
is not inherited by the programs the holder starts (Ray, Flower's SuperLink and
ServerApp): they do not keep a killed holder's lock. Without ``fcntl`` (Windows) nothing
is locked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medfed.errors import MedfedError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunFolderInUse", "run_folder_lock"]

#: The lock file in a run folder.
LOCK_FILE = ".lock"


class RunFolderInUse(MedfedError):
    """Another medfed process runs the study in this run folder."""


@contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder for this process until the block ends (the folder is made if need be).

    Raises
    ------
    RunFolderInUse
        At once (no waiting) when another process holds it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = run_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise RunFolderInUse(
                f"Run folder {run_dir} is in use by another medfed process (pid {holder}); wait for it or stop it."
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _holder(path: Path) -> str:
    """The pid the holder wrote (``unknown`` in the instant between its lock and its write)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return text if text.isdigit() else "unknown"
