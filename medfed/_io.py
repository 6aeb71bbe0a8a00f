"""Small file helpers shared by the parts that write run outputs."""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from medfed.errors import MedfedError

__all__ = ["OutputFolderError", "check_output_folder", "json_text", "made_folder", "write_bytes_atomic"]


class OutputFolderError(MedfedError):
    """An output folder that cannot be made or written, or that holds what must not be overwritten."""


def check_output_folder(folder: str | Path, option: str = "--out", *, results: bool = True) -> Path:
    """Refuse, before any work, an output folder that a file stands in the way of, or that cannot be written.

    Parameters
    ----------
    folder : str or Path
        The folder results will go to; it need not exist yet (nothing is made here).
    option : str
        How the user gave it, named in the message.
    results : bool
        The folder receives results (a model, a run, a preview), which are shared: a
        folder that holds private keys (a certificate folder given by mistake) is refused.

    Returns
    -------
    Path
        ``folder`` as a Path.
    """
    folder = Path(folder)
    too_long = _too_long(folder)
    if too_long is None:
        try:
            return _check_output_folder(folder, option, results)
        except OSError as exc:  # ENAMETOOLONG on a file system with other limits than it says
            if exc.errno != errno.ENAMETOOLONG:
                raise
            too_long = "a name in it or its path is longer than its file system allows"
    raise OutputFolderError(
        f"The output folder {_shortened(str(folder))} cannot be made: {too_long}; give a shorter one ({option})."
    )


def _too_long(folder: Path) -> str | None:
    """What of ``folder`` is longer than its file system allows (a name in it, or the whole path), or None.

    Checked before any lookup: a name too long under a folder that does not exist yet
    passes every lookup (the missing folder answers first) and fails only when made.
    """
    existing = next((path for path in folder.parents if os.path.isdir(path)), Path("."))
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(os.pathconf(existing, name))
        except (OSError, ValueError):
            limits.append(default)
    name_max, path_max = limits
    longest = max(folder.parts, key=lambda part: len(os.fsencode(part)), default="")
    if len(os.fsencode(longest)) > name_max:
        return (f"the name {_shortened(longest, 30)} is {len(os.fsencode(longest))} bytes long, and its file "
                f"system allows {name_max}")
    path_bytes = len(os.fsencode(str(folder.absolute())))
    if path_bytes >= path_max:  # PATH_MAX counts the terminating NUL
        return f"its path is {path_bytes} bytes long, and its file system allows {path_max - 1}"
    return None


def _shortened(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_output_folder(folder: Path, option: str, results: bool) -> Path:
    for path in (folder, *folder.parents):
        if path.is_symlink() and not path.exists():
            raise OutputFolderError(
                f"The output folder {folder} cannot be made: {path} is a link to {os.readlink(path)}, which does "
                f"not exist; give a folder ({option})."
            )
        if path.exists() and not path.is_dir():
            raise OutputFolderError(
                f"The output folder {folder} cannot be made: {path} is a file; give a folder ({option})."
            )
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"The output folder {folder} cannot be written: no write permission in {existing} ({option})."
        )
    keys = sorted(p.name for p in folder.glob("*.key")) if results and folder.is_dir() else []
    if keys:
        raise OutputFolderError(
            f"{folder} holds private keys ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}): a certificate "
            f"folder, not a place for results that will be shared; give another folder ({option})."
        )
    return folder


@contextmanager
def made_folder(folder: str | Path) -> Iterator[Path]:
    """Make ``folder`` (and its missing parents) now; if the block fails, remove what was made while it is empty.

    Made before long work, so that a folder that cannot be made fails at once; removed
    after a failure or Ctrl-C, so that a failed run leaves no empty folder behind.
    """
    folder = Path(folder)
    created = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]  # nearest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty (something was written): keep it and its parents
                break
        raise


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder and
    an atomic rename: a reader sees the old file or the new one, never half of it.

    ``mode`` (e.g. ``0o600`` for a private key) is set before any byte is written; None
    gives the mode ``open()`` would (``0o666`` less the umask). Temporary files of this
    ``path`` left by a writer that was killed (SIGKILL, power loss) more than
    :data:`STALE_TEMPORARY_S` seconds ago are removed first: they would stay for good."""
    path = Path(path)
    _remove_stale_temporaries(path)
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


#: A temporary file of :func:`write_bytes_atomic` older than this is a dead writer's: a
#: live one writes and renames within seconds, even a large model.
STALE_TEMPORARY_S = 600.0


def private_folder(folder: str | Path) -> Path:
    """Make ``folder`` (and its parents) if missing, readable by this account alone where this
    account owns it (0700, POSIX; also a folder an older medfed made 0755); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if os.name == "posix":
        with suppress(OSError):
            status = folder.stat()
            if status.st_uid == os.getuid() and status.st_mode & 0o077:
                folder.chmod(0o700)
    return folder


def _remove_stale_temporaries(path: Path) -> None:
    cutoff = time.time() - STALE_TEMPORARY_S
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with suppress(OSError):  # gone meanwhile, or not ours to remove
            if leftover.is_file() and not leftover.is_symlink() and leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as standard JSON (RFC 8259): NaN and +-inf become ``null``.

    Python's ``json`` writes ``NaN``, which JavaScript's ``JSON.parse``, R's jsonlite and
    most other readers refuse; a metric that is undefined (AUC on a split of one class) or a
    diverged loss is therefore written as ``null``. NumPy scalars and arrays become numbers
    and lists, paths strings.

    Raises
    ------
    TypeError
        For a value that has no JSON form (e.g. a tensor or a set).
    """
    return json.dumps(_finite_or_null(value), indent=indent, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":  # NumPy scalars and arrays
        return _finite_or_null(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return value
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable")
