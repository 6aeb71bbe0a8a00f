"""Small file helpers shared by the parts that write run outputs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_bytes_atomic"]


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder and
    an atomic rename: a reader sees the old file or the new one, never half of it.

    ``mode`` (e.g. ``0o600`` for a private key) is set before any byte is written; None
    gives the mode ``open()`` would (``0o666`` less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); by default give it the mode open() would,
        # so that colleagues on a shared server read a model as they read the report.
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask
