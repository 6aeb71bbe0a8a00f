"""Starting Flower's processes and making sure none outlives the medfed command.

Flower's SuperLink and SuperNode start helpers of their own (SuperExec, one
``flwr-serverapp`` or ``flwr-clientapp`` process per task), some in new sessions, so
killing the process we started is not enough. :class:`ProcessSet` starts each child in
its own session with a marker in its environment (inherited by every descendant) and,
on :meth:`ProcessSet.stop`, terminates the children's process groups and then every
process that carries the marker: nothing is left behind, whatever Flower detached.
On Linux each child also gets SIGKILL when the medfed process dies without cleaning
up, e.g. killed with SIGKILL (``PR_SET_PDEATHSIG``); Flower's helpers follow their parents.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["ProcessSet", "flower_executable", "free_port", "interrupt_on_sigterm", "marked_processes", "wait_for_port"]

#: Environment variable that marks every process a :class:`ProcessSet` started.
MARKER_ENV = "MEDFED_PROCESS_SET"


def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flower-superlink``...) next to this Python."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, alive=lambda: True) -> bool:
    """Wait until something accepts TCP connections on ``host:port``; False on timeout or when ``alive()`` is False."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class ProcessSet:
    """Child processes started together and stopped together.

    Flower starts its helpers (``flower-superexec``, ``flwr-serverapp``...) by name, from
    PATH: the children's PATH starts with a private folder (mode 0700, removed by
    :meth:`stop`, or by the next ProcessSet when this process was killed) whose task executables run only medfed's own app
    (:mod:`medfed.deploy.app_guard`), then this Python's own folder.

    Parameters
    ----------
    env : Mapping[str, str], optional
        Extra environment for every child (on top of this process's).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        from medfed.deploy.app_guard import write_guarded_executables

        self.marker = uuid.uuid4().hex
        _remove_orphaned_app_folders()
        self.guarded_apps = write_guarded_executables(tempfile.mkdtemp(prefix=f"{_APP_FOLDER_PREFIX}{os.getpid()}-"))
        folders = [str(self.guarded_apps), str(Path(sys.executable).parent)]
        path = os.pathsep.join([*folders, os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, **(env or {}), MARKER_ENV: self.marker}
        self.children: list[subprocess.Popen] = []

    def start(self, command: Sequence[str], *, log: Path | None = None, env: Mapping[str, str] | None = None,
              stdout: int | IO | None = None) -> subprocess.Popen:
        """Start ``command`` in a new session, its output appended to ``log`` (else ``stdout``)."""
        handle = open(log, "ab") if log is not None else None  # noqa: SIM115 - the child owns it
        try:
            child = subprocess.Popen(
                list(command), env={**self.env, **(env or {})}, start_new_session=True, preexec_fn=_die_with_parent,
                stdin=subprocess.DEVNULL, stdout=handle if handle is not None else stdout,
                stderr=subprocess.STDOUT if (handle is not None or stdout is not None) else None,
            )
        finally:
            if handle is not None:
                handle.close()
        self.children.append(child)
        return child

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM every child's group, SIGKILL what is left after ``grace_s``, then every marked process."""
        for child in self.children:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            _signal_group(child, signal.SIGKILL)
            try:
                child.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        for pid in marked_processes(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.guarded_apps, ignore_errors=True)

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: A :class:`ProcessSet`'s private folder is ``{tempdir}/medfed-apps-{pid}-{random}``.
_APP_FOLDER_PREFIX = "medfed-apps-"


def _remove_orphaned_app_folders() -> None:
    """Remove the private folders of medfed processes that died without :meth:`ProcessSet.stop`
    (killed with SIGKILL): their pid, in the folder's name, no longer runs."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_APP_FOLDER_PREFIX}*-*"):
        pid = folder.name[len(_APP_FOLDER_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
        except OSError:  # removed meanwhile by another medfed process
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, another user's
            continue


def marked_processes(marker: str, env: str = MARKER_ENV) -> list[int]:
    """Pids of this user's processes (but this one) whose environment carries
    ``env=marker`` (Linux; else [])."""
    needle = f"{env}={marker}".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the medfed process dies without cleaning up (Linux).

    SIGKILL, not SIGTERM: a SIGTERMed SuperLink waits for open connections to close,
    which took over 20 s on a loaded machine. Its state is SQLite with a write-ahead log,
    made to survive a kill; its helpers watch its pid and exit after it.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)  # the child leads its own session and group
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block, so the same clean-up runs for both."""
    def handler(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
