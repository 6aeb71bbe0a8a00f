"""``medfed server``: Flower's SuperLink with TLS and site keys, then the experiment on it.

What :func:`run_server` does, in order:

1. checks the experiment, the run folder (fresh, or ``resume``) and the certificate
   folder, before anything starts;
2. starts ``flower-superlink`` with TLS (``ca.crt``, ``server.crt``, ``server.key``),
   SuperNode authentication and a persistent SQLite state in
   ``RUN_DIR/flower/state.db`` (node registrations survive a restart, so the sites
   reconnect on their own), its log in ``RUN_DIR/flower/superlink.log``; and the
   SuperExec that starts the run's ServerApp, with a secret the two share
   (``--isolation process``: the Runtime API on the open port answers no one else);
3. registers every site of ``trusted_sites.txt`` under its name (once; a restarted
   server finds them registered) through Flower's Control API;
4. from then on, stops within a second any run it did not submit and withdraws any key
   that is not in ``trusted_sites.txt`` (:class:`_SuperLinkWatch`): Flower's Control API
   shares the one port and has no login. The Flower processes it starts run no app but
   medfed's own (:mod:`medfed.deploy.app_guard`). Then it waits for
   ``federation.num_sites`` sites to connect, printing each by name;
5. submits the run with ``flwr run`` (``FLWR_HOME=RUN_DIR/flower``; a generated Flower
   app whose run config is the experiment and nothing else): the same ServerApp as
   ``medfed simulate`` runs the rounds and writes ``RUN_DIR`` (given to it through
   ``MEDFED_RUN_DIR``, never through the run config that the sites receive). Progress
   (rounds, sites left out, sites the server waits for, quorum) is printed from
   ``RUN_DIR/metrics.jsonl``, and the run's end read from its status in the SuperLink;
   Flower's own log, the ServerApp's included, goes to ``RUN_DIR/flower/superlink.log``;
6. on success, on error and on Ctrl-C (or SIGTERM), stops every process it started
   (:class:`~medfed.deploy.processes.ProcessSet`). The run folder then resumes with
   ``medfed server --resume --run-dir RUN_DIR``. A server killed outright (SIGKILL, a
   crash) cannot clean up: its SuperLink dies with it, but Flower's ``flwr-serverapp``
   may go on retrying for minutes, still holding the run folder. So the server notes its
   process marker in ``RUN_DIR/flower/server.json``, and the next server on that folder
   first stops whatever still carries the previous marker (and refuses to start while
   the previous server itself is alive).

Latency: the ServerApp pulls replies every 0.5 s instead of Flower's 3 s
(:class:`medfed.server.recording.RecordingGrid`); the SuperNodes start a ClientApp within
0.1 s of a message (:mod:`medfed.deploy.supernode`). The SuperLink's own task poll stays
at Flower's 1 s: it only delays the start of a run, and each poll writes to the SQLite
state, which an overloaded machine then reports as "database is locked".
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medfed._io import private_folder, write_bytes_atomic
from medfed.config import ExperimentConfig, to_run_config
from medfed.deploy.app_guard import EXPECTED_PYPROJECT_ENV
from medfed.deploy.certs import ServerCerts, server_certs
from medfed.deploy.processes import (
    ProcessSet,
    flower_executable,
    interrupt_on_sigterm,
    marked_processes,
    wait_for_port,
)
from medfed.errors import MedfedError
from medfed.server.metrics_log import parse_line, read_metrics
from medfed.server.run_files import METRICS_FILE, REGISTERED_SITES_FILE

__all__ = ["DEFAULT_ADDRESS", "DeployError", "parse_address", "run_server"]

DEFAULT_ADDRESS = "0.0.0.0:9092"
CONNECTION = "medfed"
FLOWER_HOME = "flower"
STATE_DB = "state.db"
SUPERLINK_LOG = "superlink.log"
SERVER_FILE = "server.json"
#: The secret the SuperLink and its SuperExec share (mode 0600, new at each start).
SUPEREXEC_SECRET = "superexec.secret"


class DeployError(MedfedError):
    """A deployment command cannot start or went wrong in a way the user can act on."""


@dataclass(frozen=True)
class Address:
    """``host:port`` split (IPv6 hosts without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def local(self) -> Address:
        """Where a process on this machine reaches a server bound to this address."""
        if self.host in ("0.0.0.0", "", "::"):
            return Address("127.0.0.1", self.port)
        return self


def parse_address(text: str, what: str = "--address") -> Address:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) or raise a one-line :class:`DeployError`."""
    text = (text or "").strip()
    if "://" in text:
        raise DeployError(f"{what} takes HOST:PORT without a scheme (TLS is on unless --insecure). Got {text!r}.")
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        example = "hospital.example.org:9092" if what == "--server" else "0.0.0.0:9092 or hospital.example.org:9092"
        raise DeployError(f"{what} must be HOST:PORT, e.g. {example}. Got {text!r}.")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DeployError(f"{what}: {host!r} is not an IPv6 address; write IPv6 hosts as [addr]:port.") from None
    return Address(host, int(port_text))


def run_server(
    cfg: ExperimentConfig, *, certs: str | Path | None, address: str = DEFAULT_ADDRESS,
    run_dir: str | Path | None = None, resume: bool = False, insecure: bool = False,
    join_timeout_s: float | None = None, out=None,
) -> Path:
    """Start the SuperLink, wait for the sites and run ``cfg``; see the module docstring.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (every site receives it).
    certs : str or Path or None
        The ``medfed certs`` folder; may be None only with ``insecure``.
    address : str
        ``HOST:PORT`` to listen on (the one port the sites connect to).
    run_dir : str or Path, optional
        Run folder; default ``{cfg.output_dir}/{cfg.name}``.
    resume : bool
        Continue the run in ``run_dir`` from its last complete round.
    insecure : bool
        No TLS and no site authentication (testing only; warns).
    join_timeout_s : float, optional
        When the sites have not all connected after this many seconds, start with
        those connected if they make the quorum (``federation.min_sites``), else stop
        (default: wait for all until Ctrl-C).
    out : file, optional
        Where progress lines go (default stdout).

    Returns
    -------
    Path
        The run folder, holding the finished run.

    Raises
    ------
    DeployError, CertsError, ResumeError, ConfigError
        Bad input, a SuperLink that does not start, or a run that did not finish.
    RunFolderInUse
        Another medfed process runs in ``run_dir``.
    """
    from medfed.server.resume import check_checkpoint_fits, check_run_dir
    from medfed.server.run_lock import run_folder_lock
    from medfed.simulation.run import _preflight

    out = out or sys.stdout
    listen = parse_address(address)
    run_dir = Path(run_dir if run_dir is not None else Path(cfg.output_dir) / cfg.name).expanduser().resolve()
    check_run_dir(cfg, run_dir, resume)
    reference = _preflight(cfg, simulated=False)
    if resume:
        check_checkpoint_fits(run_dir, reference)
    if insecure:
        _say(out, "WARNING: --insecure: no TLS and no site authentication. Updates travel in clear text and "
                  "any machine that reaches the port can join. Use only for a test on a closed network.")
        tls = None
    else:
        if certs is None:
            raise DeployError("medfed server needs --certs DIR (made by 'medfed certs'), or --insecure for a test.")
        tls = server_certs(certs)
        if len(tls.trusted_sites) < cfg.federation.num_sites:
            raise DeployError(
                f"The experiment has federation.num_sites={cfg.federation.num_sites} but {certs} trusts only "
                f"{len(tls.trusted_sites)} site(s) ({', '.join(tls.trusted_sites)}); make keys for every site."
            )
    # One medfed process per run folder (medfed.server.run_lock), held to the end: the
    # ServerApp writes the folder from Flower's processes, which this server starts and
    # stops. Checked again under the lock, for a run that another process began or ended
    # since the check above.
    with run_folder_lock(run_dir):
        check_run_dir(cfg, run_dir, resume)
        return _serve(cfg, run_dir=run_dir, resume=resume, listen=listen, tls=tls, certs=certs, address=address,
                      insecure=insecure, join_timeout_s=join_timeout_s, out=out)


def _serve(cfg: ExperimentConfig, *, run_dir: Path, resume: bool, listen: Address, tls: ServerCerts | None,
           certs: str | Path | None, address: str, insecure: bool, join_timeout_s: float | None, out) -> Path:
    """:func:`run_server` from the Flower processes on, with the run folder locked."""
    from medfed.simulation.run import app_pyproject

    home = run_dir / FLOWER_HOME
    env = {
        "FLWR_HOME": str(home), "MEDFED_RUN_DIR": str(run_dir), "MEDFED_RESUME": "1" if resume else "0",
        "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
        "FLWR_DISABLE_UPDATE_CHECK": os.environ.get("FLWR_DISABLE_UPDATE_CHECK", "1"),  # no call home either
        # The ServerApp runs only the app written below (medfed.deploy.app_guard).
        EXPECTED_PYPROJECT_ENV: str(home / "app" / "pyproject.toml"),
    }
    # Refusals first, so that a refused start writes nothing (another server's Flower
    # config names its own address); a killed server's leftovers go before the port check.
    _stop_previous_server(home, out)
    _check_port_free(listen)
    processes = ProcessSet(env)  # from here on its stop() runs (it also removes its temporary folder)
    try:
        # Flower's state database holds every site's replies (weights included): the
        # server's account alone reads it, whatever the umask (SQLite makes it 0644).
        (private_folder(home) / "app").mkdir(exist_ok=True)
        _claim(home, processes.marker)
        (home / "app" / "pyproject.toml").write_text(app_pyproject(to_run_config(cfg), deployed=True), encoding="utf-8")
        _write_flower_config(home, listen.local, tls)
        with interrupt_on_sigterm():
            new_superexec_secret(home)
            superlink = processes.start(_superlink_command(listen, home, tls), log=home / SUPERLINK_LOG)
            if not wait_for_port(listen.local.host, listen.port, 60.0, alive=lambda: superlink.poll() is None):
                raise DeployError(
                    f"The SuperLink did not start on {listen}: {_last_line(home / SUPERLINK_LOG)} "
                    f"(full log: {home / SUPERLINK_LOG})."
                )
            superexec = processes.start(_superexec_command(listen, home, tls, superlink.pid), log=home / SUPERLINK_LOG)
            scheme = "http (INSECURE)" if tls is None else "https with TLS and site keys"
            _say(out, f"medfed server: listening on {listen} ({scheme}); run folder {run_dir}")
            control = _Control(listen.local, tls)
            watch = None
            try:
                if tls is not None:
                    for name in control.trust_exactly(tls.trusted_sites):
                        _say(out, f"medfed server: no longer trusts the old key of site {name} (removed or replaced "
                                  "in --certs)")
                for run_id in control.stop_unfinished_runs():
                    _say(out, f"medfed server: stopped run {run_id}, left unfinished by the previous server")
                watch = _SuperLinkWatch(_Control(listen.local, tls), out,
                                        None if tls is None else public_keys(tls.trusted_sites),
                                        registered_file=run_dir / REGISTERED_SITES_FILE,
                                        superlink_log=home / SUPERLINK_LOG)
                watch.check()  # the study's ServerApp reads the registrations from the first round on
                watch.start()
                _wait_for_sites(control, cfg.federation.num_sites, cfg.federation.quorum, join_timeout_s, out)
                watch.announce_sites()
                with watch.submitting() as own_runs:
                    run_id = _submit(home, processes.env)
                    own_runs.add(run_id)
                _say(out, f"medfed server: run {run_id} started; Flower's log: {home / SUPERLINK_LOG}")
                _follow(control, run_id, run_dir, cfg.rounds, out,
                        alive=lambda: superlink.poll() is None and superexec.poll() is None, log=home / SUPERLINK_LOG)
            finally:
                if watch is not None:
                    watch.stop()
                    watch.join(timeout=5)
                    watch.control.close()
                control.close()
    except KeyboardInterrupt:
        # The caller says how to resume (the CLI prints the whole command line).
        _say(out, "medfed server: interrupted; stopping the SuperLink and the run's apps")
        raise
    finally:
        processes.stop()
    _check_finished(run_dir, home, resume_command(run_dir, certs=certs, address=address,
                                                  join_timeout_s=join_timeout_s, insecure=insecure))
    return run_dir


def _check_port_free(listen: Address) -> None:
    """Refuse a port another program listens on: waiting for "the port answers" would then
    take the other program for this server's SuperLink (another study's, which this server
    would register keys with and whose runs it would stop)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: closed connections do not count
        try:
            probe.bind((listen.host, listen.port))
        except OSError as err:
            raise DeployError(
                f"Port {listen.port} on {listen.host} is in use ({err.strerror or err}), by another program or another "
                "medfed server; stop it, or give this server another --address."
            ) from None


def _stop_previous_server(home: Path, out) -> None:
    """Refuse a run folder that another live medfed server uses; stop what a killed one left running."""
    path = home / SERVER_FILE
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        pid, old_marker, started = int(previous["pid"]), str(previous["marker"]), previous.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if previous is not None:
        if pid != os.getpid() and started is not None and _start_time(pid) == started:
            raise DeployError(
                f"Another medfed server (pid {pid}) is using the run folder {home.parent}; stop it first, or "
                "give this server its own --run-dir."
            )
        leftovers = marked_processes(old_marker)
        for leftover in leftovers:
            try:
                os.kill(leftover, signal.SIGKILL)
            except OSError:
                pass
        if leftovers:
            _say(out, f"medfed server: stopped {len(leftovers)} Flower process(es) left by the previous server")


def _claim(home: Path, marker: str) -> None:
    """Note in the run folder that this server uses it, and the marker of its Flower processes."""
    (home / SERVER_FILE).write_text(
        json.dumps({"pid": os.getpid(), "started": _start_time(os.getpid()), "marker": marker}), encoding="utf-8")


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (Linux: field 22 of /proc/PID/stat; None elsewhere or when gone):
    with the pid, it names one process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _submit(home: Path, env: dict[str, str]) -> int:
    """Submit the generated app with ``flwr run`` and return the run id."""
    command = [flower_executable("flwr"), "run", str(home / "app"), CONNECTION, "--format", "json"]
    done = subprocess.run(command, env={**env, "FLWR_HOME": str(home)}, capture_output=True, text=True, timeout=300)
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
        return int(reply["run-id"])
    except (ValueError, KeyError, TypeError):
        detail = " ".join((done.stdout + done.stderr).split())[-300:]
        raise DeployError(f"Flower did not accept the run: {detail}") from None


def _follow(control: _Control, run_id: int, run_dir: Path, rounds: int, out, *,
            alive=lambda: True, log: Path | None = None) -> None:
    """Print the run's progress from ``metrics.jsonl`` until Flower reports the run finished.

    The run's own log stream (``flwr run --stream``) ends on the first transient
    SuperLink error, so the run's end is read from its status instead. Raises
    :class:`DeployError` when ``alive()`` turns False (the SuperLink or the SuperExec
    that starts the ServerApp has exited: the run would never start or end).
    """
    metrics = run_dir / METRICS_FILE
    offset = metrics.stat().st_size if metrics.exists() else 0
    status_due = 0.0
    while True:
        offset = _print_progress(metrics, offset, rounds, out)
        if not alive():
            detail = f": {_last_line(log)} (full log: {log})" if log is not None else ""
            raise DeployError(f"Flower's SuperLink or its SuperExec stopped during run {run_id}{detail}.")
        if time.monotonic() >= status_due:
            status_due = time.monotonic() + 5.0
            try:
                if control.run_status(run_id) == "finished":
                    _print_progress(metrics, offset, rounds, out)
                    return
            except Exception:  # noqa: BLE001 - a busy SuperLink; ask again
                pass
        time.sleep(0.5)


def _print_progress(metrics: Path, offset: int, rounds: int, out) -> int:
    if not metrics.exists():
        return offset
    with metrics.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.decode("utf-8", errors="replace").splitlines():
        try:
            record = parse_line(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        text = _progress_line(record, rounds)
        if text:
            _say(out, text)
    return offset + len(complete)


def _progress_line(record: dict, rounds: int) -> str | None:
    from medfed.server.resume import rounds_phrase

    event = record.get("event")
    if event == "start":
        resumed = record.get("resumed_from_round") or 0
        return f"medfed server: training {rounds_phrase(rounds)}" + (f", resuming after round {resumed}" if resumed else "")
    if event == "round":
        train, evaluate = record.get("train", {}), record.get("evaluate", {})
        parts = [f"round {record['round']}/{rounds} done in {record.get('wall_time_s', 0):.1f} s"]
        if "loss" in train:
            parts.append(f"train loss {train['loss']:.4f}")
        if "acc" in evaluate:
            parts.append(f"test acc {evaluate['acc']:.4f}" + (f" auc {evaluate['auc']:.4f}" if "auc" in evaluate else ""))
        if record.get("model_kept"):
            parts.append(f"global model kept: {record['model_kept']}")
        if record.get("evaluation_skipped"):
            parts.append(f"evaluation skipped: {record['evaluation_skipped']}")
        return "medfed server: " + ", ".join(parts)
    if event == "dropout":
        return (f"medfed server: round {record['round']} {record['phase']}: site {record['site']} left out: "
                f"{record['reason']}")
    if event == "site_left_out":
        return (f"medfed server: site {record['site']} left out of the run: {record['reason']} (asked again while "
                "the run goes on)")
    if event == "waiting_for_sites":  # the ServerApp asked the sites to check their data; some are late
        missing = ", ".join(str(name) for name in record.get("missing", [])) or "?"
        return (f"medfed server: round {record.get('round', '?')}: waiting for site(s) {missing} to check their data "
                f"({record.get('answered', '?')} of {record.get('asked', '?')} answered; at most "
                f"{record.get('remaining_s', '?')} s more, then the run goes on without their answer)")
    if event == "site_admitted":
        return f"medfed server: site {record['site']}'s data now fits the study; it takes part from this round"
    if event == "quorum_missed":
        return (f"medfed server: round {record['round']}: {record['sites']} site(s) {record['stage']}, quorum "
                f"{record['needed']}: the global model is unchanged; retrying the round")
    if event == "end":
        return f"medfed server: finished {rounds_phrase(record.get('rounds_done', rounds))}"
    return None


def _superlink_command(listen: Address, home: Path, tls: ServerCerts | None) -> list[str]:
    """The SuperLink; its ServerApps are started by :func:`_superexec_command`'s SuperExec."""
    command = [
        flower_executable("flower-superlink"), "--host", listen.host, "--port", str(listen.port),
        "--database", str(home / STATE_DB), "--disable-runtime-dependency-installation",
        "--isolation", "process", "--superexec-auth-secret-file", str(home / SUPEREXEC_SECRET),
    ]
    if tls is None:
        return command + ["--insecure"]
    return command + [
        "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth",
    ]


def _superexec_command(listen: Address, home: Path, tls: ServerCerts | None, superlink_pid: int) -> list[str]:
    """The SuperExec that starts the run's ServerApp, proving itself with the run folder's secret.

    The SuperLink serves its Runtime API on the study's one port. Left to start its own
    SuperExec (``--isolation subprocess``) it hands a run's ServerApp task to whoever asks
    first, and a stranger polling every few milliseconds wins that race: their own
    ServerApp then drives the study and receives every site's trained weights. With
    ``--isolation process`` and a secret only this server and its SuperExec hold, the
    SuperLink answers that SuperExec alone.
    """
    command = [
        flower_executable("flower-superexec"), "--runtime-api-address", str(listen.local),
        "--superexec-auth-secret-file", str(home / SUPEREXEC_SECRET), "--parent-pid", str(superlink_pid),
    ]
    return command + (["--insecure"] if tls is None else ["--root-certificates", str(tls.ca_cert)])


def new_superexec_secret(home: Path) -> None:
    """A new random secret for the SuperLink and its SuperExec, readable by this user alone."""
    secret = home / SUPEREXEC_SECRET
    secret.unlink(missing_ok=True)
    descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(32))


def _write_flower_config(home: Path, local: Address, tls: ServerCerts | None) -> None:
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{local}"']
    if tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{tls.ca_cert}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def public_keys(sites: dict[str, str]) -> dict[str, bytes]:
    """Site name -> its public key as Flower stores it, from OpenSSH public keys (``trusted_sites.txt``)."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return {name: public_key_to_bytes(serialization.load_ssh_public_key(text.encode("ascii")))
            for name, text in sites.items()}


class _Control:
    """Flower's Control API client (what the ``flwr`` CLI uses), for node registration and listing."""

    def __init__(self, local: Address, tls: ServerCerts | None) -> None:
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        connection = SuperLinkConnection(
            name=CONNECTION, address=str(local), root_certificates=None if tls is None else str(tls.ca_cert),
            insecure=tls is None,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # Flower's "Using SuperLink: ..." line: not ours to print
            self.client = init_http_client_from_connection(connection)

    def trust_exactly(self, sites: dict[str, str]) -> list[str]:
        """Make the SuperLink trust the keys of ``sites`` (name -> OpenSSH public key) and no other.

        The SuperLink keeps its registrations in the run folder's state database, across
        restarts and resumes: a site removed from ``trusted_sites.txt`` or given a new key
        by ``medfed certs --force`` is unregistered here, and the new keys registered.

        Returns
        -------
        list[str]
            The names of the sites whose old registration was withdrawn.
        """
        from flwr.proto.control_pb2 import RegisterNodeRequest

        wanted = public_keys(sites)
        registered = [node for node in self.nodes() if node.status != "unregistered"]
        withdrawn = [node for node in registered if not _holds_trusted_key(node, wanted)]
        kept = {node.name for node in registered if _holds_trusted_key(node, wanted)}
        # New keys first: Flower never registers a key twice (not even one it withdrew), so a
        # renamed or re-added site fails here, before any registration has been withdrawn.
        for name, key in wanted.items():
            if name in kept:
                continue
            try:
                self.client.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
            except Exception as err:  # noqa: BLE001 - Flower's error types differ per transport
                raise DeployError(
                    f"The SuperLink refused the key of site {name} ({err}): this run folder's SuperLink has trusted "
                    f"that key before (under another name, or before the site was removed), and Flower never "
                    f"registers a key twice; make {name} a new key with medfed certs --force."
                ) from None
        for node in withdrawn:
            self.unregister(node.node_id)
        return sorted(node.name or f"node-{node.node_id}" for node in withdrawn)

    def unregister(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self.client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def nodes(self) -> list:
        """The SuperLink's nodes (``NodeInfo``: ``node_id``, ``name``, ``status``)."""
        from flwr.proto.control_pb2 import ListNodesRequest

        return list(self.client.ListNodes(ListNodesRequest()).nodes_info)

    def run_status(self, run_id: int) -> str:
        """The run's status: ``pending``, ``starting``, ``running`` or ``finished``."""
        from flwr.proto.control_pb2 import ListRunsRequest

        return self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id].status.status

    def stop_unfinished_runs(self, keep: set[int] = frozenset()) -> list[int]:
        """Stop every unfinished run but those in ``keep``; return their ids.

        At the start, these are what a killed server left in the state database (a resume
        starts a new run); later, runs that someone else submitted (:class:`_SuperLinkWatch`).
        """
        from flwr.proto.control_pb2 import ListRunsRequest, StopRunRequest

        stopped = []
        for run_id, run in self.client.ListRuns(ListRunsRequest()).run_dict.items():
            if run.status.status != "finished" and run_id not in keep:
                self.client.StopRun(StopRunRequest(run_id=run_id))
                stopped.append(run_id)
        return stopped

    def online(self) -> dict[int, str]:
        """Node id -> site name (``node-<id>`` without one) of the connected nodes."""
        return {node.node_id: node.name or f"node-{node.node_id}" for node in self.nodes() if node.status == "online"}

    def close(self) -> None:
        self.client.close()


def _wait_for_sites(control: _Control, count: int, quorum: int, timeout_s: float | None, out) -> None:
    """Wait for ``count`` sites; after ``timeout_s`` go on with a quorum, else raise."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: set[str] = set()
    _say(out, f"medfed server: waiting for {count} site(s) to connect (Ctrl-C to stop)")
    while True:
        online = control.online()
        names = set(online.values())
        for name in sorted(seen - names):
            seen.discard(name)
            _say(out, f"medfed server: site {name} left ({len(seen)}/{count})")
        for name in sorted(names - seen):
            seen.add(name)
            # More than expected is legal (held-out sites, spare keys): say so, not "(3/2)".
            counter = f"{len(seen)}/{count}" if len(seen) <= count else f"{len(seen)} connected, {count} expected"
            _say(out, f"medfed server: site {name} joined ({counter})")
        if len(online) >= count:
            return
        if deadline is not None and time.monotonic() >= deadline:
            if len(online) >= quorum:
                _say(out, f"medfed server: starting with {len(online)} of {count} sites (quorum {quorum})")
                return
            raise DeployError(
                f"Only {len(online)} of {count} site(s) connected within {timeout_s:g} s "
                f"({', '.join(sorted(seen)) or 'none'}); check the sites' 'medfed client' and the firewall."
            )
        time.sleep(0.5)


class _SuperLinkWatch(threading.Thread):
    """Every second, keeps the SuperLink to the study: stops the runs this server did not
    submit, withdraws the keys it did not register, and says which sites leave or rejoin.

    Flower's Control API shares the server's port and has no login, so whoever reaches the
    port can submit a run or register a key (see "Network" in the README). Their app does
    not run (:mod:`medfed.deploy.app_guard`); this takes their run and their key away
    within a second, while the server runs. A run is this server's when it was submitted
    inside :meth:`submitting`. Sites that leave or join are said once :meth:`announce_sites`
    was called (before it, :func:`_wait_for_sites` says so with its counter).

    Parameters
    ----------
    control : _Control
    out : file
    trusted : dict[str, bytes] or None
        Site name -> registered public key (:func:`public_keys`); None with ``--insecure``,
        where the SuperLink registers no keys.
    registered_file : Path
        Where the trusted nodes' ids and names are kept for the ServerApp
        (:data:`~medfed.server.run_files.REGISTERED_SITES_FILE`; removed with ``--insecure``).
    superlink_log : Path or None
        The SuperLink's log, where Flower records (and tells no one) that a SuperNode with a
        key the study does not trust tried to join: said once per key, from the lines written
        after the watch was made.
    """

    def __init__(self, control: _Control, out, trusted: dict[str, bytes] | None, registered_file: Path,
                 superlink_log: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.control = control
        self.out = out
        self.trusted = trusted
        self.registered_file = registered_file
        self.superlink_log = superlink_log
        self._log_offset = superlink_log.stat().st_size if superlink_log is not None and superlink_log.exists() else 0
        self._unknown_keys: set[bytes] = set()
        self._registered: dict[str, str] | None = None
        self._announcing = False
        self._online: set[str] | None = None  # the trusted sites online at the last check once announcing
        self.own_runs: set[int] = set()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    @contextlib.contextmanager
    def submitting(self):
        """Hold the watch while this server submits a run; yields the set to add its id to."""
        with self._lock:
            yield self.own_runs

    def announce_sites(self) -> None:
        """From now on, say which sites go offline or join; the sites online now, as
        :meth:`check` counts them (a stranger's node withdrawn), are not announced."""
        self._announcing = True
        self.check()

    def check(self) -> None:
        """Stop foreign runs, withdraw foreign keys and say who left or joined, once."""
        with self._lock:
            for run_id in self.control.stop_unfinished_runs(keep=self.own_runs):
                _say(self.out, f"medfed server: stopped run {run_id}, which this server did not submit (someone "
                               "reached the server's port: see 'Network' in the README)")
            registered, online = {}, set()
            for node in self.control.nodes():
                if node.status == "unregistered":
                    continue
                if self.trusted is not None and not _holds_trusted_key(node, self.trusted):
                    self.control.unregister(node.node_id)
                    _say(self.out, f"medfed server: withdrew a key registered as {node.name or 'a site'} that is "
                                   "not in trusted_sites.txt (someone reached the server's port: see 'Network' in "
                                   "the README)")
                    continue
                registered[str(node.node_id)] = node.name
                if node.status == "online":
                    online.add(node.name or f"node-{node.node_id}")
            if self.trusted is None:
                self.registered_file.unlink(missing_ok=True)
            elif registered != self._registered:
                write_bytes_atomic(self.registered_file, json.dumps(registered, sort_keys=True).encode("utf-8"))
                self._registered = registered
            if self._online is not None:
                for name in sorted(online - self._online):
                    _say(self.out, f"medfed server: site {name} joined")
                for name in sorted(self._online - online):
                    _say(self.out, f"medfed server: site {name} went offline")
            if self._announcing:
                self._online = online
            self._say_unknown_keys()

    def _say_unknown_keys(self) -> None:
        if self.superlink_log is None or self.trusted is None:
            return
        try:
            with self.superlink_log.open("rb") as handle:
                handle.seek(self._log_offset)
                data = handle.read()
        except OSError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        for match in _UNKNOWN_KEY.finditer(complete.decode("utf-8", errors="replace")):
            key = match.group(1).replace("\\n", "\n").encode("ascii")  # Flower logs the key's repr
            if key in self._unknown_keys or key in self.trusted.values():
                continue
            self._unknown_keys.add(key)
            _say(self.out, f"medfed server: a site whose key is not in trusted_sites.txt tried to join (key "
                           f"{_key_fingerprint(key)}, as 'ssh-keygen -lf site.pub' shows it at the site); if it "
                           "belongs to the study, add its line to trusted_sites.txt and start the server again")

    def run(self) -> None:
        failures = 0
        while not self._stop_event.wait(1.0):
            try:
                self.check()
                failures = 0
            except Exception as err:  # noqa: BLE001 - a busy or stopping SuperLink; look again
                failures += 1
                if failures == 30 and not self._stop_event.is_set():  # said once per outage, not every second
                    _say(self.out, f"medfed server: cannot check for runs and keys it did not make for 30 s "
                                   f"({type(err).__name__}: {str(err)[:120]}); still trying")

    def stop(self) -> None:
        self._stop_event.set()


#: Flower's log line for a SuperNode whose key no registration holds (the key as a bytes repr).
_UNKNOWN_KEY = re.compile(r"public key: b'(-----BEGIN PUBLIC KEY-----[A-Za-z0-9+/=\\n]+?-----END PUBLIC KEY-----"
                          r"(?:\\n)?)', exception: No SuperNode found with the given public key")


def _key_fingerprint(pem: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a PEM public key (what ``ssh-keygen -lf`` prints)."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    try:
        openssh = serialization.load_pem_public_key(pem).public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except ValueError:
        return "unreadable"
    digest = hashlib.sha256(base64.b64decode(openssh.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _holds_trusted_key(node, trusted: dict[str, bytes]) -> bool:
    """Whether ``node`` (Flower's ``NodeInfo``) is registered under a site's name with that site's key."""
    return trusted.get(node.name) == bytes(node.public_key)


def resume_command(run_dir: str | Path, *, certs: str | Path | None, address: str = DEFAULT_ADDRESS,
                   join_timeout_s: float | None = None, insecure: bool = False) -> str:
    """The ``medfed server`` command line that continues ``run_dir`` with the same sites, quoted for the shell."""
    words = ["medfed", "server", "--resume", "--run-dir", str(run_dir)]
    if certs:
        words += ["--certs", str(certs)]
    if address != DEFAULT_ADDRESS:
        words += ["--address", address]
    if join_timeout_s is not None:
        short = f"{join_timeout_s:g}"  # 60, not 60.0; but :g rounds 1234567 to 1.23457e+06
        words += ["--join-timeout", short if float(short) == join_timeout_s else repr(join_timeout_s)]
    if insecure:
        words.append("--insecure")
    return shlex.join(words)


def _check_finished(run_dir: Path, home: Path, resume: str) -> None:
    from medfed.server.quorum import quorum_advice  # imports Flower's ServerApp: not before it is needed

    path = run_dir / METRICS_FILE
    records = read_metrics(path) if path.is_file() else []
    if records and records[-1].get("event") == "end":
        return
    missed = [r for r in records if r.get("event") == "quorum_missed"]
    advice = f"Resume it with: {resume}"
    if records and records[-1].get("event") == "stopped":
        reason = str(records[-1].get("reason"))
    elif missed and records[-1] is missed[-1]:
        last = missed[-1]
        reason = (f"round {last['round']} had {last['sites']} site(s) {last['stage']}, below the quorum of "
                  f"{last['needed']} (federation.min_sites), {last['attempt']} time(s) in a row")
        advice = quorum_advice(records, int(last["round"]), advice)
    else:
        reason = f"the ServerApp failed: {_server_app_error(home / SUPERLINK_LOG)}"
    raise DeployError(
        f"The run did not finish: {reason}. {advice} (log: {home / SUPERLINK_LOG}; "
        f"medfed report {shlex.quote(str(run_dir))} reports the rounds done)."
    )


def _server_app_error(path: Path) -> str:
    """The exception that ended the ServerApp, from Flower's log (else its last error line)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    starts = [i for i, line in enumerate(lines) if "ServerApp raised an exception" in line]
    if starts:
        for line in lines[starts[-1]:]:
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b[^:]*: ", line):
                return line.strip()[:400]
    return _last_line(path)


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "ERROR" in line or "Error" in line or "exception" in line]
    return (errors or lines or ["no log"])[-1][:300]


def _say(out, text: str) -> None:
    print(text, file=out, flush=True)

