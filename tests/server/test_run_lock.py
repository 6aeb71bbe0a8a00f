"""One medfed process per run folder (medfed.server.run_lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from medfed.server.run_lock import LOCK_FILE, RunFolderInUse, run_folder_lock

_HOLDER = """
import sys, time
from medfed.server.run_lock import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(run_dir) -> subprocess.Popen:
    """Another process that holds the run folder (it says when)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, env=env)
    assert process.stdout.readline().strip() == b"locked"
    return process


def test_a_second_holder_is_refused_in_one_line_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    with run_folder_lock(run_dir):
        with pytest.raises(RunFolderInUse) as info:
            with run_folder_lock(run_dir):
                pass
    assert str(info.value) == (f"Run folder {run_dir} is in use by another medfed process (pid {os.getpid()}); "
                               "wait for it or stop it.")
    with run_folder_lock(run_dir):  # released at the end of the block
        pass


def test_another_process_holds_the_folder_until_it_is_killed(tmp_path):
    # Prepare
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        # Execute / Assert: refused at once while it runs...
        started = time.monotonic()
        with pytest.raises(RunFolderInUse, match=f"in use by another medfed process \\(pid {holder.pid}\\)"):
            with run_folder_lock(run_dir):
                pass
        assert time.monotonic() - started < 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # ...and free once it is killed: the kernel drops a dead process's lock.
    with run_folder_lock(run_dir):
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
