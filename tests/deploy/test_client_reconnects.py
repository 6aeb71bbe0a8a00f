"""`medfed client` keeps its SuperNode running and names the real reason it cannot connect.

Flower's SuperNode is replaced by a shell script (one scripted behaviour per start);
the server by a local TLS (or plain) listener, so no Flower process runs here.
"""

from __future__ import annotations

import io
import socket
import ssl
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from medfed.cli import main
from medfed.deploy import supernode
from medfed.deploy.certs import make_certs
from medfed.deploy.processes import free_port
from medfed.deploy.superlink import DeployError, parse_address
from medfed.deploy.supernode import probe_server, run_client

pytestmark = pytest.mark.skipif(sys.platform.startswith("win"), reason="the stand-in SuperNode is a shell script")

CONNECTED = 'echo "INFO :      SuperNode ID: 7"'
RETRYING = 'echo "WARNING :   Connection attempt failed, retrying in 1.00 seconds"'
REFUSED = 'echo "ERROR :     Exit Code: 305"; exit 1'


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Certificates for sites a and b, a's data, and no pause between SuperNode starts."""
    make_certs(tmp_path / "certs", "127.0.0.1", ["a", "b"])
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "breastmnist.npz", **{
        f"{split}_{kind}": np.zeros((2, 28, 28) if kind == "images" else (2, 1), np.uint8)
        for split in ("train", "val", "test") for kind in ("images", "labels")})
    monkeypatch.setattr(supernode, "REFUSED_PAUSE_S", 0.05)
    return tmp_path


def fake_supernode(tmp_path: Path, monkeypatch, *runs: str) -> Path:
    """Stand in for flower-supernode: start i runs shell snippet i (the last one repeats);
    ``$wait`` is its --max-wait-time. Returns the file that gets one line of arguments per start."""
    cases = "".join(f"  {i}) {body};;\n" for i, body in enumerate(runs[:-1], start=1)) + f"  *) {runs[-1]};;\n"
    script = tmp_path / "flower-supernode"
    script.write_text(
        f'#!/bin/sh\nn=$(($(cat "{tmp_path}/runs" 2>/dev/null || echo 0) + 1)); echo $n > "{tmp_path}/runs"\n'
        f'echo "$@" >> "{tmp_path}/args"\n'
        'wait=0; prev=; for a in "$@"; do [ "$prev" = --max-wait-time ] && wait=$a; prev=$a; done\n'
        f"case $n in\n{cases}esac\n"
    )
    script.chmod(0o755)
    superexec = tmp_path / "flower-superexec"  # the SuperNode's own SuperExec: nothing to do here
    superexec.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/superexec-args"\n')
    superexec.chmod(0o755)
    monkeypatch.setattr(supernode, "flower_executable",
                        lambda name: str(superexec if name == "flower-superexec" else script))
    return tmp_path / "args"


@contextmanager
def listener(certs: Path | None, host: str = "127.0.0.1"):
    """A server on 127.0.0.1 that completes TLS handshakes with ``certs``' server.crt, or
    (None) answers like an HTTP server without TLS. Yields its port."""
    context = None
    if certs is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs / "server.crt", certs / "server.key")
    server = socket.create_server((host, 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if context is not None:
                        context.wrap_socket(conn, server_side=True).close()
                    else:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def client(tmp_path: Path, port: int | str, **kwargs) -> None:
    run_client(server=f"127.0.0.1:{port}" if isinstance(port, int) else port, site="a", data=tmp_path / "data",
               certs=tmp_path / "certs" / "sites" / "a", out=kwargs.pop("out", io.StringIO()), **kwargs)


def test_a_supernode_that_ends_by_itself_is_started_again_until_sigterm(site, monkeypatch):
    # Prepare: the first SuperNode connects, then ends with exit 0, as Flower's does when a
    # server on a new run folder does not know its node; the second is stopped by SIGTERM.
    args = fake_supernode(site, monkeypatch, f'{CONNECTED}; echo "SuperNode terminated gracefully."; exit 0',
                          "kill -TERM $PPID; sleep 30")
    out = io.StringIO()
    with listener(site / "certs") as port:
        # Execute / Assert: started again, and SIGTERM still stops the client.
        with pytest.raises(KeyboardInterrupt):
            client(site, port, out=out)
    assert len(args.read_text().splitlines()) == 2
    assert "site a: the SuperNode ended (the server restarted or forgot this site); starting it again" in out.getvalue()
    assert "site a: stopping" in out.getvalue()


def test_a_supernode_that_keeps_ending_stops_the_client(site, monkeypatch):
    # Prepare
    monkeypatch.setattr(supernode, "MAX_CRASHES", 2)
    args = fake_supernode(site, monkeypatch, "exit 3")
    with listener(site / "certs") as port:
        # Execute / Assert
        with pytest.raises(DeployError, match=r"stopped 3 times in 300 s \(last exit code 3\)"):
            client(site, port)
    assert len(args.read_text().splitlines()) == 3


def test_the_default_state_folder_is_medfed_state_in_the_working_folder(site, monkeypatch):
    # The site's state goes in STATE_DIR/<site>/<run key>/ (medfed.client.site_state): the
    # default folder must not name the site a second time.
    monkeypatch.chdir(site)
    monkeypatch.setattr(supernode, "MAX_CRASHES", 0)
    args = fake_supernode(site, monkeypatch, "exit 3")
    with listener(site / "certs") as port:
        with pytest.raises(DeployError):
            client(site, port)
    assert f'state-dir="{site.resolve() / "medfed-state"}"' in args.read_text()


def test_probe_tells_the_causes_apart(tmp_path):
    # Prepare: this site's certificates, and another study's.
    make_certs(tmp_path / "ours", "127.0.0.1", ["a"])
    make_certs(tmp_path / "theirs", "127.0.0.1", ["a"])
    ca = tmp_path / "ours" / "sites" / "a" / "ca.crt"
    closed = parse_address(f"127.0.0.1:{free_port()}")
    # Execute / Assert
    assert probe_server(closed, ca) == (False, f"cannot reach {closed} (connection refused): is the server "
                                               "running and the address right?")
    lasting, text = probe_server(parse_address("no-such-host.invalid:9092"), ca)
    assert not lasting and "cannot reach no-such-host.invalid:9092 (name not resolved)" in text
    with listener(tmp_path / "ours") as port:
        assert probe_server(parse_address(f"127.0.0.1:{port}"), ca) is None
        assert probe_server(parse_address(f"localhost:{port}"), ca) is None
        lasting, text = probe_server(parse_address(f"127.0.0.1:{port}"), None)  # --insecure against TLS
        assert lasting and "uses TLS, and this site was started with --insecure: drop --insecure" in text
    with listener(tmp_path / "ours", host="127.0.0.2") as port:  # not a name in the certificate
        lasting, text = probe_server(parse_address(f"127.0.0.2:{port}"), ca)
        assert lasting and "the server's certificate is not valid for 127.0.0.2" in text
    with listener(tmp_path / "theirs") as port:
        lasting, text = probe_server(parse_address(f"127.0.0.1:{port}"), ca)
        assert lasting and f"is not signed by this site's {ca}" in text
    with listener(None) as port:
        lasting, text = probe_server(parse_address(f"127.0.0.1:{port}"), ca)
        assert lasting and "does not speak TLS (started with --insecure?)" in text
        assert probe_server(parse_address(f"127.0.0.1:{port}"), None) is None  # --insecure on both sides


@pytest.mark.parametrize("server, expected", [
    ("theirs", "is not signed by this site's"),
    ("plain", "does not speak TLS (started with --insecure?)"),
    ("closed", "(connection refused): is the server running and the address right? (gave up after 1 s, --max-wait)"),
])
def test_client_names_the_real_cause_not_a_refused_key(site, monkeypatch, capsys, server, expected):
    # Prepare: a SuperNode that fails to connect the way Flower's does (exit code 305).
    args = fake_supernode(site, monkeypatch, REFUSED)
    make_certs(site / "theirs", "127.0.0.1", ["a"])
    argv = ["client", "--site", "a", "--data", str(site / "data"), "--certs", str(site / "certs" / "sites" / "a"),
            "--max-wait", "1"]
    # Execute
    if server == "closed":
        code = main(argv + ["--server", f"127.0.0.1:{free_port()}"])
    else:
        with listener(site / "theirs" if server == "theirs" else None) as port:
            code = main(argv + ["--server", f"127.0.0.1:{port}"])
    # Assert: one line naming the cause; the SuperNode never started.
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert expected in err and "refused the key" not in err
    assert not args.exists()


def test_a_refused_key_is_reported_when_the_server_answers(site, monkeypatch):
    # Prepare
    fake_supernode(site, monkeypatch, REFUSED)
    with listener(site / "certs") as port:
        # Execute / Assert
        with pytest.raises(DeployError, match="The server refused the key of site a for 0.5 s"):
            client(site, port, max_wait_s=0.5)


def test_max_wait_bounds_the_total_wait(site, monkeypatch):
    # Prepare: the server answers the first probe, then goes away; the SuperNode retries for
    # its --max-wait-time, then fails to connect (Flower: exit code 305).
    fake_supernode(site, monkeypatch, f'{RETRYING}; sleep "$wait"; {REFUSED}')
    probes = iter([None])
    gone = (False, "cannot reach 127.0.0.1:9 (connection refused): is the server running and the address right?")
    monkeypatch.setattr(supernode, "probe_server", lambda address, ca: next(probes, gone))
    start = time.monotonic()
    # Execute / Assert
    with pytest.raises(DeployError, match=r"connection refused.*gave up after 2 s, --max-wait"):
        client(site, "127.0.0.1:9", max_wait_s=2)
    assert time.monotonic() - start < 3.5  # 2 s of waiting, not 2 x 2 s


def _output_of_a_site_that_loses_the_server(site: Path, monkeypatch, before: str = "true") -> str:
    """The SuperNode connects, runs the shell snippet ``before``, then Flower retries (the
    server went away), then SIGTERM. Returns what the client printed."""
    fake_supernode(site, monkeypatch, f"{CONNECTED}; {before}; {RETRYING}; sleep 1; kill -TERM $PPID; sleep 30")
    probes = iter([None])  # the server answers before the SuperNode starts, then is gone
    gone = (False, "cannot reach 127.0.0.1:9 (connection refused): is the server running and the address right?")
    monkeypatch.setattr(supernode, "probe_server", lambda address, ca: next(probes, gone))
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        client(site, "127.0.0.1:9", out=out)
    return out.getvalue()


def test_a_connected_site_that_loses_the_server_says_why(site, monkeypatch):
    # Execute
    text = _output_of_a_site_that_loses_the_server(site, monkeypatch)
    # Assert: medfed's reason follows Flower's retry line.
    assert ("medfed client: site a: lost the server: cannot reach 127.0.0.1:9 (connection refused): is the server "
            "running and the address right? Flower keeps trying to reconnect.") in text
    assert text.index("Connection attempt failed") < text.index("lost the server")


@pytest.mark.parametrize("after_last_round, finished", [
    ('echo "INFO :      [a] round 3/3: test acc 0.8 (the study\'s last round)"', True),
    ('echo "INFO :      [a] round 2/3: test acc 0.8"', False),
    # the mark, then another message: the study went on after it (a longer resumed study)
    ('echo "INFO :      [a] round 3/3 epoch 1/1 (the study\'s last round)"; '
     'echo "INFO :      Receiving: evaluate message (ID: 1)"', False),
])
def test_a_site_whose_server_ends_after_the_last_round_says_the_study_finished(site, monkeypatch, after_last_round,
                                                                                finished):
    # The study ended and its server stopped: the site used to say only "lost the server:
    # connection refused: is the server running?", as after a crash.
    text = _output_of_a_site_that_loses_the_server(site, monkeypatch, before=after_last_round)
    assert ("medfed client: site a: the server closed after the study's last round: the study has most likely "
            "finished." in text) == finished
    assert ("lost the server" in text) != finished


def test_a_watch_of_the_lost_server_ends_with_its_supernode(site, monkeypatch):
    # A SuperNode that lost the server and then ended by itself left its watch probing for
    # good (every REFUSED_PAUSE_S, for the rest of the client's life).
    fake_supernode(site, monkeypatch, f"{CONNECTED}; {RETRYING}; sleep 0.5; exit 0", "kill -TERM $PPID; sleep 30")
    probes = []
    gone = (False, "cannot reach 127.0.0.1:9 (connection refused): is the server running and the address right?")
    # The client itself finds the server; its watch (another thread) finds it gone.
    monkeypatch.setattr(supernode, "probe_server", lambda address, ca: probes.append(1) or (
        None if threading.current_thread() is threading.main_thread() else gone))
    with pytest.raises(KeyboardInterrupt):
        client(site, "127.0.0.1:9")
    # Assert: no probe after the client stopped.
    time.sleep(0.5)
    calls = len(probes)
    time.sleep(0.5)
    assert len(probes) == calls


def test_a_site_whose_server_comes_back_with_new_certificates_stops_and_says_why(site, monkeypatch):
    # After 'medfed certs --force', the server returned with another CA: Flower retried the
    # TLS handshake forever, and the site's last medfed line was the stale "connection refused".
    fake_supernode(site, monkeypatch, f"{CONNECTED}; {RETRYING}; sleep 30")
    gone = (False, "cannot reach 127.0.0.1:9 (connection refused): is the server running and the address right?")
    remade = (True, "the server's certificate is not signed by this site's ca.crt")
    probes = iter([None, gone, gone])  # the server answers the first probe, is down, then back with new certs
    monkeypatch.setattr(supernode, "probe_server", lambda address, ca: next(probes, remade))
    out = io.StringIO()
    start = time.monotonic()
    with pytest.raises(DeployError, match=r"^Site a: the server's certificate is not signed by this site's ca.crt\.$"):
        client(site, "127.0.0.1:9", out=out)
    assert time.monotonic() - start < 20  # the SuperNode's 30 s sleep was cut short
    said = [line for line in out.getvalue().splitlines() if "lost the server" in line]
    assert said == [f"medfed client: site a: lost the server: {gone[1]} Flower keeps trying to reconnect."]


def test_a_state_folder_the_site_cannot_write_is_refused_before_connecting(site, monkeypatch):
    # It failed only after round 1's training (FedBN saves its state then), three times, and
    # stopped the study.
    args = fake_supernode(site, monkeypatch, "exit 3")
    (site / "a-file").write_text("not a folder")
    with pytest.raises(DeployError, match=r"^The site's state folder .*a-file/state cannot be written \(.*\); give a "
                                          r"folder this site can write \(--state-dir\)\.$"):
        client(site, 9, state_dir=site / "a-file" / "state")
    assert not args.exists()  # the SuperNode never started


def test_a_held_out_site_and_its_allowed_plugins_reach_the_clientapp_through_the_node_config(site, monkeypatch):
    from flwr.common.config import parse_config_args

    from medfed.client.site_data import policy_refusal, site_role
    from medfed.config import config_from_dict

    monkeypatch.setattr(supernode, "MAX_CRASHES", 0)
    args = fake_supernode(site, monkeypatch, "exit 3")
    with listener(site / "certs") as port:
        with pytest.raises(DeployError):
            client(site, port, held_out=True, allowed_strategies=["mypkg.heads:LocalHead", "lab.fed:Other"])
    line = args.read_text()
    node_config = parse_config_args([line[line.index("site-name="):line.index(" --host")]])
    cfg = config_from_dict({"strategy": {"name": "mypkg.heads:LocalHead"}})
    assert site_role(node_config, 7, cfg) == ("a", True)
    assert policy_refusal(node_config, cfg) is None


@pytest.mark.parametrize("path", ["fedavg", "mypkg.heads", "mypkg heads:X", ":X", "a:b:c"])
def test_allow_strategy_takes_plugin_import_paths_only(site, monkeypatch, path):
    args = fake_supernode(site, monkeypatch, "exit 3")
    with pytest.raises(DeployError, match=r"--allow-strategy .* is not a plug-in's import path"):
        client(site, 9, allowed_strategies=[path])
    assert not args.exists()


def test_the_client_command_passes_held_out_and_allowed_plugins_on(site, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(supernode, "_keep_running", lambda command, *rest: seen.update(command=command))
    argv = ["client", "--site", "a", "--data", str(site / "data"), "--certs", str(site / "certs" / "sites" / "a"),
            "--server", "127.0.0.1:9", "--held-out", "--allow-strategy", "mypkg.heads:LocalHead",
            "--no-pooled-test-metrics"]
    assert main(argv) == 0
    node_config = seen["command"][seen["command"].index("--node-config") + 1]
    assert 'held-out="true"' in node_config and 'allowed-strategies="mypkg.heads:LocalHead"' in node_config
    assert 'pooled-test-metrics="false"' in node_config
    assert "held out: it evaluates the global model and never trains; it runs the plug-in strategies " \
           "mypkg.heads:LocalHead; it never sends histograms of its test scores" in capsys.readouterr().out
    # Without the options, none of the three.
    assert main(argv[:9]) == 0
    assert "held-out" not in seen["command"][seen["command"].index("--node-config") + 1]
    assert "pooled-test-metrics" not in seen["command"][seen["command"].index("--node-config") + 1]


def test_the_sites_task_api_answers_only_its_own_superexec(site, monkeypatch):
    # Flower's default SuperNode hands a message to whoever polls its local task API first:
    # any account on the site's machine could read the global model, the site's kept state
    # and its data path, and reply in its name. medfed's SuperNode asks for its SuperExec's
    # secret (a file only this account reads).
    import os
    import subprocess

    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from medfed.deploy.processes import ProcessSet, wait_for_port

    seen = {}
    monkeypatch.setattr(supernode, "_keep_running", lambda command, env, *rest: seen.update(
        command=command, env=env, task_home=rest[-1]))
    client(site, 9)  # a server that is not there: the task API is served all the same
    assert seen["task_home"] == site / "medfed-state" / "a" / "flower"
    task_args, superexec = supernode._task_api_commands(seen["task_home"])  # what each start adds
    command = seen["command"] + task_args
    secret = Path(command[command.index("--superexec-auth-secret-file") + 1])
    assert command[command.index("--isolation") + 1] == "process"
    assert superexec[superexec.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) >= 32
    task_api = f"127.0.0.1:{command[command.index('--port') + 1]}"
    assert superexec[superexec.index("--runtime-api-address") + 1] == task_api
    processes = ProcessSet({**os.environ, **seen["env"]})
    try:
        node = processes.start(command, stdout=subprocess.DEVNULL)
        assert wait_for_port("127.0.0.1", int(task_api.rpartition(":")[2]), 60.0, alive=lambda: node.poll() is None)
        stranger = RuntimeHttpClient.from_server_address(
            server_address=task_api, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-superexec")])
        with pytest.raises(Exception, match="401 Unauthorized"):
            stranger.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    finally:
        processes.stop()


def test_the_superexecs_connection_lines_are_not_taken_for_the_supernodes(tmp_path, monkeypatch):
    # The SuperExec polls the SuperNode's local port with Flower's HTTP retries, which print
    # the lines the SuperNode prints about the server. Read as the SuperNode's, a refused
    # key looked connected, and the client retried a refused key for good.
    fake_node = tmp_path / "node.py"
    fake_node.write_text(
        "import socket, sys, time\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "server = socket.socket(); server.bind(('127.0.0.1', port)); server.listen()\n"
        "time.sleep(1.5); print('Exit Code: 305', flush=True); time.sleep(0.5)\n")
    fake_exec = tmp_path / "flower-superexec"
    fake_exec.write_text("#!/bin/sh\necho 'WARNING : Connection attempt failed, retrying in 0.69 seconds'\n"
                         "echo 'INFO : Connection successful after 1 retries'\nsleep 30\n")
    fake_exec.chmod(0o755)
    monkeypatch.setattr(supernode, "flower_executable", lambda name: str(fake_exec))
    out = io.StringIO()
    # Execute
    code, refused, connected, failing_since = supernode._run_supernode(
        [sys.executable, str(fake_node)], {}, "a", out, task_home=tmp_path / "flower")
    # Assert: the SuperExec ran (its lines are echoed) but only the SuperNode's lines count.
    assert "Connection successful after 1 retries" in out.getvalue()
    assert (refused, connected, failing_since) == (True, False, None)


def test_a_supernode_whose_superexec_ends_is_stopped_and_says_why(tmp_path, monkeypatch):
    # Without its SuperExec the SuperNode would stay connected, take messages and run none.
    fake_node = tmp_path / "node.py"
    fake_node.write_text(
        "import socket, sys, time\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "server = socket.socket(); server.bind(('127.0.0.1', port)); server.listen()\n"
        "time.sleep(60)\n")
    fake_exec = tmp_path / "flower-superexec"
    fake_exec.write_text("#!/bin/sh\nexit 7\n")
    fake_exec.chmod(0o755)
    monkeypatch.setattr(supernode, "flower_executable", lambda name: str(fake_exec))
    why: list[str] = []
    started = time.monotonic()
    # Execute
    supernode._run_supernode([sys.executable, str(fake_node)], {}, "a", io.StringIO(), task_home=tmp_path / "flower",
                             stopped_because=why)
    # Assert
    assert why == ["its SuperExec ended, exit code 7"] and time.monotonic() - started < 30
