"""``medfed client``: one site's Flower SuperNode, after checking the site's data.

:func:`run_client` validates the data folder first (every image and label read once:
a bad folder fails here, in one line, not in round 3), then starts ``flower-supernode``
with the site's private key (SuperNode authentication), the CA certificate that checks
the server, and the node config the ClientApp reads (``site-name``, ``data-path``,
``device``). The SuperNode reconnects on its own when the server restarts, and is
started again when it ends by itself (a server on a new run folder does not know its
node). Before each start, and when it could not connect, :func:`probe_server` checks
the server's address and certificate, so that the message names the real cause. Ctrl-C
(or SIGTERM) stops it and every ClientApp process it started. Flower's files (the app of
each study, installed at its first message) go to ``STATE_DIR/SITE/flower``
(:data:`FLOWER_HOME`), not to ``~/.flwr``.

The SuperNode hands each message to a ClientApp process through its local task API
(a port on 127.0.0.1). Left to start its own SuperExec (Flower's default), it answers
that API without asking who polls it: any local account could take a message first and
read the global model, the site's kept state and its node config (data path included),
and reply in the site's name. ``medfed client`` therefore starts the SuperNode with
``--isolation process`` and its own SuperExec, both holding a secret that only this
account can read (``STATE_DIR/SITE/flower/superexec.secret``, new at every start), as
``medfed server`` does for its SuperLink.

What leaves the site: the model's weights after local training and the metrics of
:mod:`medfed.client.client_app` (counts, loss, ACC/AUC, confusion matrix, the same per
patient group; and, only in a study that sets ``federation.pooled_test_metrics``, score
histograms fine enough to tell a small test split's labels). Images, file names and the
data path never do.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from medfed._io import private_folder
from medfed.client import LAST_ROUND_MARK
from medfed.deploy.certs import site_certs, validate_site_name
from medfed.deploy.processes import ProcessSet, flower_executable, free_port, interrupt_on_sigterm, wait_for_port
from medfed.deploy.superlink import SUPEREXEC_SECRET, Address, DeployError, new_superexec_secret, parse_address

__all__ = ["FLOWER_HOME", "check_site_data", "probe_server", "run_client"]

#: Seconds between the SuperNode's checks for a message to run (Flower's default: 1 s).
CLIENTAPP_POLL_S = "0.1"
#: Seconds :func:`probe_server` waits for a connection or a TLS handshake.
PROBE_TIMEOUT_S = 5.0
#: The SuperNode's Flower home (``FLWR_HOME``), in the site's own folder of its state
#: folder (``STATE_DIR/SITE/flower``; a run key, the other folders there, is hexadecimal):
#: Flower installs each run's app under it, in ``apps/``, instead of in ``~/.flwr``.
FLOWER_HOME = "flower"
#: The folders Flower installs medfed's app in (``apps/PUBLISHER.NAME.VERSION.HASH``, the
#: FAB's hash cut to 8 digits): one per distinct study configuration, reused for the same one.
_MEDFED_APP_FOLDER = re.compile(r"medfed\.medfed-[a-z]+\.\d+\.\d+\.\d+\.[0-9a-f]{8}")
_TASKS = ("multi-class", "multi-label, binary-class")


def check_site_data(path: str | Path) -> str:
    """Validate a site's data folder as the ClientApp will read it; return a one-line summary.

    The folder holds either official MedMNIST ``.npz`` files or a site folder of images
    with ``labels.csv`` (:func:`medfed.data.load_site_folder`). It needs training images
    and test (or validation) images.

    Raises
    ------
    medfed.errors.MedfedError
        One line naming the problem (missing folder, unreadable image, bad label...).
    """
    from medfed.client.site_data import SiteDataError
    from medfed.data.medmnist_files import parse_medmnist_filename
    from medfed.data.site_folder import is_site_folder

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SiteDataError(f"--data {folder} is a file; give the site's data folder (the folder that holds it).")
    if not folder.is_dir():
        raise SiteDataError(f"The site data folder {folder} does not exist (--data).")
    # Only the official files of MedMNIST 2D datasets, as the ClientApp (site_data) reads
    # them: another .npz next to labels.csv (a site's own features) is not data for medfed.
    npz_files = sorted(p for p in folder.glob("*.npz") if parse_medmnist_filename(p.name))
    if npz_files:  # the study decides which file a site trains on: each is checked and counted
        held = {path.name: _check_medmnist_file(path) for path in npz_files}
    elif is_site_folder(folder):
        held = {"labels.csv": _check_site_folder(folder)}
    else:
        raise SiteDataError(
            f"The site data folder {folder} holds neither a MedMNIST .npz file nor labels.csv "
            "(see 'Run a real federation' in the README for the layout)."
        )
    for source, splits in held.items():
        where = f"{folder}" if len(held) == 1 else f"{folder / source}"
        if not splits.get("train"):
            raise SiteDataError(f"The site data at {where} has no training images; add a 'train' split.")
        if not (splits.get("test") or splits.get("val")):
            raise SiteDataError(f"The site data at {where} has no 'test' (or 'val') images to evaluate on; add one.")

    def counts(splits: dict[str, int]) -> str:
        return ", ".join(f"{name} {count}" for name, count in splits.items()) + " images"

    if len(held) == 1:
        return counts(next(iter(held.values())))
    return "; ".join(f"{source}: {counts(splits)}" for source, splits in held.items())


def _check_medmnist_file(path: Path) -> dict[str, int]:
    from medfed.data import DatasetSizeWarning, load_medmnist
    from medfed.data.medmnist_files import parse_medmnist_filename

    flag, size = parse_medmnist_filename(path.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSizeWarning)  # a site holds a share, not the release
        splits = load_medmnist(flag, path.parent, size, download=False)
    return {name: len(dataset) for name, dataset in splits.items()}


def _check_site_folder(folder: Path) -> dict[str, int]:
    from medfed.data import load_site_folder
    from medfed.data.errors import DatasetValidationError

    first_error: DatasetValidationError | None = None
    for task in _TASKS:  # the experiment decides the task; the labels' form tells which one they are
        try:
            splits = load_site_folder(folder, task=task)
        except DatasetValidationError as err:
            first_error = first_error or err
            continue
        return {name: len(dataset) for name, dataset in splits.items()}
    raise first_error


def run_client(
    *, server: str, site: str, data: str | Path, certs: str | Path | None, insecure: bool = False,
    device: str | None = None, max_wait_s: float | None = None, state_dir: str | Path | None = None,
    held_out: bool = False, allowed_strategies: Sequence[str] = (), pooled_test_metrics: bool = True, out=None,
) -> None:
    """Validate the site's data, then run its SuperNode until Ctrl-C (or SIGTERM).

    Parameters
    ----------
    server : str
        The server's ``HOST:PORT`` as the site reaches it.
    site : str
        This site's name (as in ``medfed certs --sites``).
    data : str or Path
        The site's data folder.
    certs : str or Path or None
        The site's folder from ``medfed certs`` (``ca.crt`` and ``site.key``), or the
        whole certificate folder; may be None only with ``insecure``.
    insecure : bool
        No TLS and no key (testing only; warns).
    device : str, optional
        Torch device for local training (``cpu``, ``cuda``, ``cuda:1``); default CUDA when present.
    max_wait_s : float, optional
        Stop when the server cannot be reached, or refuses the site's key, for this long
        in all (default: keep trying to reach it; accept a refusal for ``REFUSED_RETRY_S``,
        which covers a server still registering its sites and a site restarted after a
        crash). Either way a SuperNode that ends by itself (the server started a new study,
        a transient server error) is started again, up to ``MAX_CRASHES`` times in
        ``CRASH_WINDOW_S``; a server with the wrong certificate or without TLS stops the
        client at once.
    state_dir : str or Path, optional
        Where the site keeps what its strategy keeps between rounds (FedBN's BatchNorm,
        FairLoRA's state), in ``SITE/RUN KEY`` inside it: ``./medfed-state`` by default.
        It never leaves the site. The SuperNode's Flower home is ``SITE/flower`` in it.
    held_out : bool
        The site only evaluates the global model and never trains (an unseen hospital).
    allowed_strategies : sequence of str
        Plug-in strategies (``package.module:Class``) whose client half this site runs; a
        study with another plug-in leaves the site out at its start, with that reason
        (:func:`medfed.client.site_data.policy_refusal`). medfed's registered strategies
        always run.
    pooled_test_metrics : bool
        False: the site never sends histograms of its test scores, and a study that asks
        for them (``federation.pooled_test_metrics``) leaves it out at its start.
    out : file, optional
        Where progress lines go (default stdout).

    Raises
    ------
    medfed.errors.MedfedError
        Bad data, certificates or address; a SuperNode the server refused.
    """
    from medfed.client.site_data import ALLOWED_STRATEGIES_KEY, HELD_OUT_KEY, POOLED_TEST_METRICS_KEY

    out = out or sys.stdout
    validate_site_name(site)
    address = parse_address(server, "--server")
    summary = check_site_data(data)
    data_path = Path(data).expanduser().resolve()
    state_path = Path(state_dir if state_dir is not None else "medfed-state").expanduser().resolve()
    _check_state_folder(state_path)
    flower_home = state_path / site / FLOWER_HOME
    _remove_installed_apps(flower_home)
    node_config = (f'site-name="{site}" data-path="{_quoted(str(data_path))}" '
                   f'state-dir="{_quoted(str(state_path))}"')
    if held_out:
        node_config += f' {HELD_OUT_KEY}="true"'
    if allowed_strategies:
        node_config += f' {ALLOWED_STRATEGIES_KEY}="{_quoted(" ".join(_strategy_paths(allowed_strategies)))}"'
    if not pooled_test_metrics:
        node_config += f' {POOLED_TEST_METRICS_KEY}="false"'
    if device:
        from medfed.client.task import check_device

        check_device(device)  # an absent or unknown device is one line now, not an error every round
        node_config += f' device="{_quoted(device)}"'
    command = [flower_executable("flower-supernode"), "--superlink", str(address), "--node-config", node_config]
    if insecure:
        _say(out, "WARNING: --insecure: no TLS and no site key. The model updates travel in clear text and the "
                  "server cannot tell this site from any other machine. Use only for a test on a closed network.")
        command += ["--insecure"]
        ca_cert = None
    else:
        if certs is None:
            raise DeployError("medfed client needs --certs DIR (this site's folder from 'medfed certs'), or --insecure.")
        files = site_certs(certs, site)
        command += ["--root-certificates", str(files.ca_cert), "--auth-supernode-private-key", str(files.site_key)]
        ca_cert = files.ca_cert
    role = "; held out: it evaluates the global model and never trains" if held_out else ""
    plugins = f"; it runs the plug-in strategies {', '.join(allowed_strategies)}" if allowed_strategies else ""
    scores = "; it never sends histograms of its test scores" if not pooled_test_metrics else ""
    _say(out, f"medfed client: site {site}: data {data_path} ({summary}){role}{plugins}{scores}; connecting to "
              f"{address}{' (INSECURE)' if insecure else ' with TLS'}")
    # The SuperNode's SuperExec starts one ClientApp process per message; it looks for work
    # every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower: 1 s) in the SuperNode's
    # in-memory state, so polling often costs next to nothing.
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", CLIENTAPP_POLL_S),
           "FLWR_HOME": str(flower_home),
           # Flower's usage telemetry (on unless turned off) and its daily update check (a request
           # to Flower's server) leave a hospital only if its operator says so.
           "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
           "FLWR_DISABLE_UPDATE_CHECK": os.environ.get("FLWR_DISABLE_UPDATE_CHECK", "1")}
    with interrupt_on_sigterm():
        _keep_running(command, env, address, ca_cert, site, max_wait_s, out, flower_home)


def _strategy_paths(paths: Sequence[str]) -> list[str]:
    """``paths`` checked to be plug-in import paths (``package.module:Class``), as the
    study's ``strategy.name`` names them; nothing is imported here."""
    for path in paths:
        module, _, attribute = path.partition(":")
        if not module or not attribute or any(c.isspace() for c in path) or ":" in attribute:
            raise DeployError(
                f"--allow-strategy {path!r} is not a plug-in's import path: give 'package.module:ClassName', as in "
                "the study's strategy.name (medfed's registered strategies need no permission)."
            )
    return list(paths)


def _check_state_folder(folder: Path) -> None:
    """Make the site's state folder now and write a file in it: a folder that cannot hold the
    site's state would otherwise fail only after a round's training (a FedBN or FairLoRA
    site saves its state then), and stop the study."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medfed-write-check-"):
            pass
    except OSError as error:
        raise DeployError(
            f"The site's state folder {folder} cannot be written ({error.strerror or error}); give a folder this "
            "site can write (--state-dir)."
        ) from None


def _remove_installed_apps(home: Path) -> None:
    """Remove the copies of medfed's app that Flower installed in ``home`` for earlier runs.

    Flower installs a run's app at its first message and never removes it; each study
    (each configuration, a resume with more rounds included) is an app of its own. A run
    that is still going gets its copy back at its next message. Only folders that hold
    what medfed's app holds (``pyproject.toml``, nothing else) are removed.
    """
    try:
        folders = list((home / "apps").iterdir())
    except OSError:  # none yet
        return
    for folder in folders:
        if not _MEDFED_APP_FOLDER.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            files = list(folder.iterdir())
            if all(f.name == "pyproject.toml" and f.is_file() and not f.is_symlink() for f in files):
                shutil.rmtree(folder)
        except OSError:  # another process's, or read-only: left as it is
            continue


def _keep_running(command: list[str], env: dict[str, str], address: Address, ca_cert: Path | None, site: str,
                  max_wait_s: float | None, out, task_home: Path | None = None) -> None:
    """Run the SuperNode (with its own SuperExec when ``task_home`` is given: see
    :func:`_run_supernode`), and again whenever it ends by itself, until Ctrl-C or a
    problem to report.

    ``waiting`` is when the server became unreachable or started refusing the key (None
    while it is fine); ``max_wait_s`` bounds the time since then, Flower's own retries included.
    """
    waiting = first_refusal = None
    restarts: list[float] = []
    while True:
        waiting = _wait_for_server(address, ca_cert, site, max_wait_s, waiting, out)
        run_command = command
        if max_wait_s is not None:  # Flower gives up on an unreachable server after what is left
            left = max_wait_s - (time.monotonic() - waiting) if waiting is not None else max_wait_s
            run_command = command + ["--max-wait-time", f"{max(left, 1.0):g}"]
        lasting: list[str] = []
        stopped_because: list[str] = []
        code, refused, connected, failing_since = _run_supernode(
            run_command, env, site, out, task_home=task_home, stopped_because=stopped_because,
            on_retrying=lambda still_failing, stop, finished: _watch_lost_server(
                address, ca_cert, site, out, still_failing, lambda why: (lasting.append(why), stop()), finished))
        if lasting:  # e.g. the server came back with certificates remade by 'medfed certs --force'
            raise DeployError(f"Site {site}: {lasting[0]}.")
        if connected:
            waiting, first_refusal = failing_since, None
        elif waiting is None:
            waiting = failing_since
        now = time.monotonic()
        if refused:
            problem = probe_server(address, ca_cert)
            if problem is not None:  # not a refused key: the server went away, or TLS does not match
                waiting = now if waiting is None else waiting
                continue
            # Refused keys: the server may still be registering the sites, or may not yet
            # have marked this site offline after a crash (Flower: up to a minute).
            first_refusal = now if first_refusal is None else first_refusal
            waiting = now if waiting is None else waiting
            refused_for = REFUSED_RETRY_S if max_wait_s is None else max_wait_s
            left = refused_for - (now - (first_refusal if max_wait_s is None else waiting))
            if left <= 0:
                if ca_cert is None:
                    raise DeployError(
                        f"The server at {address} did not accept site {site} without TLS for {refused_for:g} s; a "
                        "server started without --insecure needs TLS and the site's key: drop --insecure and give "
                        "--certs."
                    )
                raise DeployError(
                    f"The server refused the key of site {site} for {refused_for:g} s: is {site!r} in the server's "
                    "trusted_sites.txt, and is this the site's own folder from 'medfed certs'?"
                )
            pause = min(REFUSED_PAUSE_S, left)
            _say(out, f"medfed client: site {site}: the server refused this site's connection (after a crash it "
                      f"holds the site's previous one for up to a minute; else it does not trust this key); trying "
                      f"again in {pause:.3g} s")
            time.sleep(pause)
            continue
        # The SuperNode ended by itself: Flower's SuperNode exits (0) when the server no
        # longer knows its node (a restarted server on a new run folder, i.e. a new study;
        # it registers the trusted keys again at start, so a new SuperNode gets in) or after
        # transient server errors (an HTTP 500 from an overloaded SuperLink): start it again,
        # within limits.
        restarts = [t for t in restarts if now - t < CRASH_WINDOW_S] + [now]
        if len(restarts) > MAX_CRASHES:
            reason = stopped_because[0] if stopped_because else f"last exit code {code}"
            raise DeployError(
                f"The SuperNode of site {site} stopped {len(restarts)} times in {CRASH_WINDOW_S:g} s ({reason}); "
                "Flower's reason is above."
            )
        if stopped_because:
            how = f"was stopped ({stopped_because[0]})"
        else:
            how = "ended (the server restarted or forgot this site)" if code == 0 else f"stopped (exit code {code})"
        _say(out, f"medfed client: site {site}: the SuperNode {how}; starting it again in {REFUSED_PAUSE_S:g} s")
        time.sleep(REFUSED_PAUSE_S)


def _wait_for_server(address: Address, ca_cert: Path | None, site: str, max_wait_s: float | None,
                     waiting: float | None, out) -> float | None:
    """Return once the server answers at ``address`` (TLS checked with ``ca_cert``); return ``waiting``,
    set if this had to wait. Raise on a lasting problem, or when ``max_wait_s`` has passed since ``waiting``."""
    said = False
    while (problem := probe_server(address, ca_cert)) is not None:
        lasting, text = problem
        if lasting:
            raise DeployError(f"Site {site}: {text}.")
        now = time.monotonic()
        waiting = now if waiting is None else waiting
        if max_wait_s is not None and now - waiting >= max_wait_s:
            raise DeployError(f"Site {site}: {text} (gave up after {max_wait_s:g} s, --max-wait).")
        if not said:
            _say(out, f"medfed client: site {site}: {text} Trying again every {REFUSED_PAUSE_S:g} s.")
            said = True
        pause = REFUSED_PAUSE_S if max_wait_s is None else min(REFUSED_PAUSE_S, waiting + max_wait_s - now)
        time.sleep(max(pause, 0.1))
    return waiting


def probe_server(address: Address, ca_cert: Path | None, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str] | None:
    """Connect to the server as the SuperNode will: None when that works, else (lasting, reason).

    With ``ca_cert``, a TLS handshake checks the server's certificate against it and the
    host name. Without (``--insecure``), a handshake that succeeds means the server wants
    TLS, which the SuperNode would learn only as refusals. A lasting reason (wrong CA,
    wrong name, TLS on one side only) will not go away by waiting.
    """
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
    except OSError as err:
        if isinstance(err, socket.gaierror):
            why = "name not resolved"
        elif isinstance(err, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(err, TimeoutError):
            why = f"no answer within {timeout_s:g} s"
        else:
            why = err.strerror or str(err)
        return False, f"cannot reach {address} ({why}): is the server running and the address right?"
    with sock:
        if ca_cert is None:
            return _speaks_tls(sock, address)
        context = ssl.create_default_context(cafile=str(ca_cert))
        try:
            context.wrap_socket(sock, server_hostname=address.host).close()
        except ssl.SSLCertVerificationError as err:
            if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                return True, (f"the server's certificate is not valid for {address.host}: use the name given to "
                              "'medfed certs --server-host' in --server")
            if err.verify_code in (2, 18, 19, 20, 21):  # no issuer / self-signed: another CA
                return True, (f"the server's certificate at {address} is not signed by this site's {ca_cert}: copy "
                              "the site folder 'medfed certs' wrote for this study")
            return True, (f"the server's certificate at {address} was not accepted ({err.verify_message}): ask the "
                          "coordinator to re-run 'medfed certs' and send this site its new folder")
        except ssl.SSLError as err:
            if err.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
                return True, (f"the server at {address} does not speak TLS (started with --insecure?): start it with "
                              "--certs, or use --insecure on both sides for a test")
            if isinstance(err, ssl.SSLEOFError):
                return False, f"cannot reach {address} (closed during the TLS handshake): is the server running?"
            return True, f"the TLS handshake with {address} failed ({err.reason or err})"
        except OSError as err:
            why = err.strerror or str(err)
            return False, f"cannot reach {address} ({why} during the TLS handshake): is the server running?"
    return None


def _speaks_tls(sock: socket.socket, address: Address) -> tuple[bool, str] | None:
    """(lasting, reason) when the server at ``address`` completes a TLS handshake, else None."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asks whether TLS is spoken; nothing is sent after
    try:
        context.wrap_socket(sock).close()
    except OSError:  # ssl.SSLError included: a server without TLS, as --insecure expects
        return None
    return True, (f"the server at {address} uses TLS, and this site was started with --insecure: drop --insecure "
                  "and give --certs, the site folder 'medfed certs' wrote")


def _watch_lost_server(address: Address, ca_cert: Path | None, site: str, out, still_failing: Callable[[], bool],
                       stop: Callable[[str], None], finished: bool = False) -> None:
    """While a connected SuperNode retries a lost server, say why (Flower only says that it
    retries), again whenever the reason changes; on a lasting reason (the server came back
    with another CA, or without TLS) call ``stop(reason)``: Flower would retry forever.
    ``finished``: the site has just answered the study's last round, so a server that
    went away most likely ended the study; that is said first."""
    said = None
    if finished:
        _say(out, f"medfed client: site {site}: the server closed after the study's last round: the study has most "
                  "likely finished. This client waits for the server's next study; stop it with Ctrl-C.")
    while still_failing():
        problem = probe_server(address, ca_cert)
        if not still_failing():  # got through again, or the SuperNode ended, during the probe
            return
        if problem is not None and problem[0]:  # said by the caller, as the client's error
            stop(problem[1])
            return
        if problem is not None and problem[1] != said and not finished:
            said = problem[1]
            _say(out, f"medfed client: site {site}: lost the server: {said} Flower keeps trying to reconnect.")
        time.sleep(REFUSED_PAUSE_S)


def _run_supernode(command: list[str], env: dict[str, str], site: str, out,
                   on_retrying: Callable[[Callable[[], bool], Callable[[], None], bool], None] | None = None,
                   task_home: Path | None = None, stopped_because: list[str] | None = None,
                   ) -> tuple[int, bool, bool, float | None]:
    """Run the SuperNode until it exits, echoing its output; ``on_retrying(still_failing,
    stop, finished)`` is called (in a thread of its own) when Flower, once connected, starts
    retrying an unreachable server: ``still_failing()`` says whether it has not got through
    again and still runs (a watch must end with its SuperNode: one left behind probed on
    for good), ``stop()`` ends the SuperNode, ``finished`` whether the site's last message was
    of the study's last round (its ClientApp logged ``LAST_ROUND_MARK``).

    With ``task_home``, the SuperNode serves its task API on a new local port with
    ``--isolation process``, and its own SuperExec (:func:`_task_api_commands`, a new secret
    in ``task_home``) is started once that port is open; it is stopped with the SuperNode,
    and the SuperNode is stopped (to be started again) if it ends first. Its output is the
    ClientApps': echoed, and watched for ``LAST_ROUND_MARK`` only. Why this stopped the
    SuperNode itself (its SuperExec ended, its port did not open) is appended to
    ``stopped_because``.

    Returns (exit code, key refused or no connection, connected once, when Flower began
    retrying an unreachable server if it had not got through again: None if not).
    """
    superexec = None
    if task_home is not None:
        task_args, superexec = _task_api_commands(task_home)
        command = command + task_args
    processes = ProcessSet(env)
    refused = threading.Event()
    connected = threading.Event()
    failing_since: list[float] = []
    last_round = threading.Event()
    ended = threading.Event()  # a watch of this SuperNode ends with it
    started: list[subprocess.Popen] = []

    def stop() -> None:  # the SuperNode: its SuperExec is stopped with the rest, once it has ended
        started[0].terminate()

    plain = not (callable(getattr(out, "isatty", None)) and out.isatty())

    def echo(stream, clientapps: bool = False) -> None:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace")
            if plain:  # a log file or a pipe: Flower's colour codes would be noise in it
                line = _ANSI_COLOUR.sub("", line)
            out.write(line)
            out.flush()
            if clientapps:  # the SuperExec's own connection lines are about the local port, not the server
                if LAST_ROUND_MARK in line:
                    last_round.set()
            elif _REFUSED in line:
                refused.set()
            elif _CONNECTED in line or _RECONNECTED in line:
                connected.set()
                failing_since.clear()
            elif LAST_ROUND_MARK in line:
                last_round.set()
            elif _RECEIVING in line:  # another message: the study goes on
                last_round.clear()
            elif _RETRYING in line and not failing_since:
                failing_since.append(time.monotonic())
                if on_retrying is not None and connected.is_set():  # a probe may take seconds: not in the echo's way
                    still_failing = lambda: bool(failing_since) and not ended.is_set()  # noqa: E731
                    threading.Thread(target=on_retrying, args=(still_failing, stop, last_round.is_set()),
                                     daemon=True).start()

    readers: list[threading.Thread] = []
    starting = threading.Lock()  # no SuperExec starts once the SuperNode's run has ended

    def run_superexec(supernode: subprocess.Popen) -> None:
        # Only once the SuperNode has the port: a SuperExec polling before would print
        # connection failures, and could poll whoever took the port first.
        host, _, port = superexec[superexec.index("--runtime-api-address") + 1].rpartition(":")
        running = lambda: supernode.poll() is None and not ended.is_set()  # noqa: E731
        def give_up(why: str) -> None:  # without its SuperExec the SuperNode would take messages and never run them
            if stopped_because is not None:
                stopped_because.append(why)
            stop()

        if not wait_for_port(host, int(port), TASK_API_WAIT_S, alive=running):
            if running():
                give_up(f"it did not open its task port in {TASK_API_WAIT_S:g} s")
            return
        with starting:
            if ended.is_set():
                return
            try:
                child = processes.start([*superexec, "--parent-pid", str(os.getpid())], stdout=subprocess.PIPE)
            except OSError as error:
                give_up(f"its SuperExec could not start: {error.strerror or error}")
                return
            started.append(child)
            reader = threading.Thread(target=echo, args=(child.stdout, True), daemon=True)
            readers.append(reader)
            reader.start()
        code = child.wait()
        if running():
            give_up(f"its SuperExec ended, exit code {code}")

    try:
        with interrupt_on_sigterm():
            supernode = processes.start(command, stdout=subprocess.PIPE)
            started.append(supernode)
            # Read in threads and wait here: the SuperNode's helpers keep the pipe open
            # after it exits, and watch for its pid to vanish, which needs this wait().
            readers.append(threading.Thread(target=echo, args=(supernode.stdout,), daemon=True))
            readers[-1].start()
            if superexec is not None:  # in a thread: a fork here could swallow a SIGTERM meant for the wait
                threading.Thread(target=run_superexec, args=(supernode,), daemon=True).start()
            code = supernode.wait()
    except KeyboardInterrupt:
        _say(out, f"medfed client: site {site}: stopping")
        raise
    finally:
        with starting:
            ended.set()
        processes.stop()
        for reader in list(readers):
            reader.join(timeout=5)
    return code, refused.is_set(), connected.is_set(), (failing_since or [None])[0]


def _task_api_commands(task_home: Path) -> tuple[list[str], list[str]]:
    """The SuperNode's task API arguments and its SuperExec's command, for one start: a new
    local port and a new secret (``task_home/superexec.secret``, 0600) that both hold."""
    try:
        new_superexec_secret(private_folder(task_home))
    except OSError as error:
        raise DeployError(f"Cannot write the SuperExec's secret in {task_home} ({error.strerror or error}); give "
                          "a state folder this account can write (--state-dir).") from None
    host, port = "127.0.0.1", str(free_port())
    secret = ["--superexec-auth-secret-file", str(task_home / SUPEREXEC_SECRET)]
    supernode_args = ["--host", host, "--port", port, "--isolation", "process", *secret]
    superexec = [flower_executable("flower-superexec"), "--runtime-api-address", f"{host}:{port}", "--insecure",
                 *secret]
    return supernode_args, superexec


#: Seconds a started SuperNode may take to open its task port before it is started again.
TASK_API_WAIT_S = 60.0
#: The colour codes in Flower's log lines (ESC [ ... m).
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
#: What Flower's SuperNode prints when it cannot open a connection to the SuperLink: a
#: refused key, or (told apart by :func:`probe_server`) an unreachable server or TLS mismatch.
_REFUSED = "Exit Code: 305"
#: ... when it connected, when it reconnected, and while it retries an unreachable server.
_CONNECTED = "SuperNode ID:"
_RECONNECTED = "Connection successful after"
_RETRYING = "Connection attempt failed"
#: ... when it receives a message for its ClientApp.
_RECEIVING = "Receiving: "
#: How long a refused site keeps trying by default, and the pause between tries (s).
REFUSED_RETRY_S = 120.0
REFUSED_PAUSE_S = 5.0
#: A SuperNode that stops unexpectedly is started again, unless it did so more than
#: MAX_CRASHES times within CRASH_WINDOW_S seconds.
MAX_CRASHES = 5
CRASH_WINDOW_S = 300.0


def _quoted(text: str) -> str:
    """``text`` escaped for a double-quoted value of Flower's node config (a TOML basic string)."""
    if '"' in text:  # Flower finds the value's end at the next double quote, escaped or not
        raise DeployError(f"{text!r} must not contain a double quote (Flower's node config cannot carry it).")
    return "".join("\\\\" if c == "\\" else f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f" else c for c in text)


def _say(out, text: str) -> None:
    print(text, file=out, flush=True)
