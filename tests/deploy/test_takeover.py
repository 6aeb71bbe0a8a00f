"""A server that starts on a run folder stops what a killed predecessor left running."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from medfed.deploy.processes import MARKER_ENV
from medfed.deploy.superlink import SERVER_FILE, DeployError, _start_time, _take_over

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


def _sleeper(env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, **(env or {})})


def test_leftovers_of_a_dead_server_are_stopped_and_the_new_marker_noted(tmp_path):
    # Prepare: a "flwr-serverapp" still carrying the old marker; its server is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = _sleeper({MARKER_ENV: "old-marker"})
    bystander = _sleeper()
    (tmp_path / SERVER_FILE).write_text(json.dumps({"pid": int(dead.stdout), "started": "1", "marker": "old-marker"}))
    out = io.StringIO()
    try:
        # Execute
        _take_over(tmp_path, "new-marker", out)
        # Assert
        assert leftover.wait(timeout=10) == -9
        assert bystander.poll() is None
        assert "stopped 1 Flower process(es) left by the previous server" in out.getvalue()
        noted = json.loads((tmp_path / SERVER_FILE).read_text())
        assert noted == {"pid": os.getpid(), "started": _start_time(os.getpid()), "marker": "new-marker"}
    finally:
        for proc in (leftover, bystander):
            proc.kill()
            proc.wait()


def test_a_live_previous_server_is_refused(tmp_path):
    # Prepare: the previous server is still running (same pid, same start time).
    running = _sleeper()
    try:
        (tmp_path / SERVER_FILE).write_text(json.dumps(
            {"pid": running.pid, "started": _start_time(running.pid), "marker": "m"}))
        # Execute / Assert
        with pytest.raises(DeployError, match=f"Another medfed server \\(pid {running.pid}\\) is using the run"):
            _take_over(tmp_path, "new", io.StringIO())
        assert running.poll() is None
    finally:
        running.kill()
        running.wait()


def test_a_missing_or_damaged_note_is_no_obstacle(tmp_path):
    # Execute
    _take_over(tmp_path, "first", io.StringIO())
    (tmp_path / SERVER_FILE).write_text("{not json")
    _take_over(tmp_path, "second", io.StringIO())
    # Assert
    assert json.loads((tmp_path / SERVER_FILE).read_text())["marker"] == "second"
