"""A server that starts on a run folder stops what a killed predecessor left running, and a refused one changes nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from medfed.deploy.processes import MARKER_ENV
from medfed.deploy.superlink import SERVER_FILE, DeployError, _claim, _start_time, _stop_previous_server

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
        _stop_previous_server(tmp_path, out)
        _claim(tmp_path, "new-marker")
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
            _stop_previous_server(tmp_path, io.StringIO())
        assert running.poll() is None
    finally:
        running.kill()
        running.wait()


def test_a_missing_or_damaged_note_is_no_obstacle(tmp_path):
    # Execute
    _stop_previous_server(tmp_path, io.StringIO())
    _claim(tmp_path, "first")
    (tmp_path / SERVER_FILE).write_text("{not json")
    _stop_previous_server(tmp_path, io.StringIO())
    _claim(tmp_path, "second")
    # Assert
    assert json.loads((tmp_path / SERVER_FILE).read_text())["marker"] == "second"


def test_a_server_refused_on_a_folder_in_use_leaves_its_flower_files_alone(tmp_path, tiny_root, tiny_config):
    # A refused second server used to rewrite the running one's config.toml with its own
    # address, and the running server's run submission then went to a port nobody served.
    from medfed.deploy.superlink import FLOWER_HOME, run_server

    cfg = tiny_config(tiny_root, tmp_path)
    home = tmp_path / "run" / FLOWER_HOME
    home.mkdir(parents=True)
    (home / "config.toml").write_text("the running server's\n")
    running = _sleeper()
    try:
        (home / SERVER_FILE).write_text(json.dumps(
            {"pid": running.pid, "started": _start_time(running.pid), "marker": "m"}))
        with pytest.raises(DeployError, match="Another medfed server"):
            run_server(cfg, certs=None, run_dir=tmp_path / "run", address="127.0.0.1:29731", insecure=True,
                       out=io.StringIO())
        assert (home / "config.toml").read_text() == "the running server's\n"
        assert sorted(p.name for p in home.iterdir()) == ["config.toml", SERVER_FILE]
    finally:
        running.kill()
        running.wait()


def test_a_server_on_a_run_folder_another_medfed_process_holds_is_refused_before_it_starts(tmp_path, tiny_root,
                                                                                        tiny_config):
    from medfed.deploy.superlink import FLOWER_HOME, run_server
    from medfed.server.run_lock import RunFolderInUse, run_folder_lock

    cfg = tiny_config(tiny_root, tmp_path)
    with run_folder_lock(tmp_path / "run"):  # a medfed simulate or server on it
        with pytest.raises(RunFolderInUse, match="is in use by another medfed process"):
            run_server(cfg, certs=None, run_dir=tmp_path / "run", address="127.0.0.1:29733", insecure=True,
                       out=io.StringIO(), join_timeout_s=1)
    assert not (tmp_path / "run" / FLOWER_HOME).exists()  # nothing started
