"""``medfed client``: one site's Flower SuperNode, after checking the site's data.

:func:`run_client` validates the data folder first (every image and label read once:
a bad folder fails here, in one line, not in round 3), then starts ``flower-supernode``
with the site's private key (SuperNode authentication), the CA certificate that checks
the server, and the node config the ClientApp reads (``site-name``, ``data-path``,
``device``). The SuperNode reconnects on its own when the server restarts. Ctrl-C (or
SIGTERM) stops it and every ClientApp process it started.

What leaves the site: the model's weights after local training and the metrics of
:mod:`medfed.client.client_app` (counts, loss, ACC/AUC, confusion matrix). Images,
labels, file names and the data path never do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from medfed.deploy.certs import site_certs, validate_site_name
from medfed.deploy.processes import ProcessSet, flower_executable, free_port, interrupt_on_sigterm
from medfed.deploy.superlink import DeployError, parse_address

__all__ = ["check_site_data", "run_client"]

#: ``{flag}.npz`` or ``{flag}_{size}.npz``: an official MedMNIST file.
#: Seconds between the SuperNode's checks for a message to run (Flower's default: 1 s).
CLIENTAPP_POLL_S = "0.1"
_MEDMNIST_FILE = re.compile(r"(?P<flag>[a-z0-9]+?)(?:_(?P<size>28|64|128|224))?\.npz")
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

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SiteDataError(f"The site data folder {folder} does not exist (--data).")
    npz_files = sorted(p for p in folder.glob("*.npz") if _MEDMNIST_FILE.fullmatch(p.name))
    if npz_files:
        splits = _check_medmnist_files(npz_files)
    elif (folder / "labels.csv").is_file() or (folder / "train" / "labels.csv").is_file():
        splits = _check_site_folder(folder)
    else:
        raise SiteDataError(
            f"The site data folder {folder} holds neither a MedMNIST .npz file nor labels.csv "
            "(see 'Run a real federation' in the README for the layout)."
        )
    if not splits.get("train"):
        raise SiteDataError(f"The site data at {folder} has no training images; add a 'train' split.")
    if not (splits.get("test") or splits.get("val")):
        raise SiteDataError(f"The site data at {folder} has no 'test' (or 'val') images to evaluate on; add one.")
    return ", ".join(f"{name} {count}" for name, count in splits.items()) + " images"


def _check_medmnist_files(files: list[Path]) -> dict[str, int]:
    from medfed.data import DatasetSizeWarning, load_medmnist
    from medfed.data.info import dataset_info

    counts: dict[str, int] = {}
    for path in files:
        match = _MEDMNIST_FILE.fullmatch(path.name)
        dataset_info(match["flag"])  # an unknown flag is a one-line error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DatasetSizeWarning)  # a site holds a share, not the release
            splits = load_medmnist(match["flag"], path.parent, int(match["size"] or 28), download=False)
        for name, dataset in splits.items():
            counts[name] = max(counts.get(name, 0), len(dataset))
    return counts


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
    device: str | None = None, max_wait_s: float | None = None, state_dir: str | Path | None = None, out=None,
) -> None:
    """Validate the site's data, then run its SuperNode until the server is done or Ctrl-C.

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
        (default: keep trying to reach it; accept a refusal for ``REFUSED_RETRY_S``, which
        covers a server still registering its sites and a site restarted after a crash;
        and start a SuperNode that stopped unexpectedly again). With it, a SuperNode that
        stops is not started again.
    state_dir : str or Path, optional
        Where the site keeps what its strategy keeps between rounds (FedBN's BatchNorm,
        FairLoRA's state): ``medfed-state/SITE`` in the working directory by default.
        It never leaves the site.
    out : file, optional
        Where progress lines go (default stdout).

    Raises
    ------
    medfed.errors.MedfedError
        Bad data, certificates or address; a SuperNode the server refused.
    """
    out = out or sys.stdout
    validate_site_name(site)
    address = parse_address(server, "--server")
    summary = check_site_data(data)
    data_path = Path(data).expanduser().resolve()
    state_path = Path(state_dir if state_dir is not None else Path("medfed-state") / site).expanduser().resolve()
    node_config = (f'site-name="{site}" data-path="{_quoted(str(data_path))}" '
                   f'state-dir="{_quoted(str(state_path))}"')
    if device:
        node_config += f' device="{_quoted(device)}"'
    command = [
        flower_executable("flower-supernode"), "--superlink", str(address), "--node-config", node_config,
        "--host", "127.0.0.1", "--port", str(free_port()),
    ]
    if max_wait_s is not None:
        command += ["--max-wait-time", str(max_wait_s)]
    if insecure:
        _say(out, "WARNING: --insecure: no TLS and no site key. The model updates travel in clear text and the "
                  "server cannot tell this site from any other machine. Use only for a test on a closed network.")
        command += ["--insecure"]
    else:
        if certs is None:
            raise DeployError("medfed client needs --certs DIR (this site's folder from 'medfed certs'), or --insecure.")
        files = site_certs(certs, site)
        command += ["--root-certificates", str(files.ca_cert), "--auth-supernode-private-key", str(files.site_key)]
    _say(out, f"medfed client: site {site}: data {data_path} ({summary}); connecting to {address}"
              f"{' (INSECURE)' if insecure else ' with TLS'}")
    # The SuperNode's SuperExec starts one ClientApp process per message; it looks for work
    # every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower: 1 s) in the SuperNode's
    # in-memory state, so polling often costs next to nothing.
    poll = os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", CLIENTAPP_POLL_S)
    refused_for = REFUSED_RETRY_S if max_wait_s is None else max_wait_s
    first_refusal = None
    crashes: list[float] = []
    while True:
        code, refused = _run_supernode(command, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": poll}, site, out)
        if not refused and code not in (0, -2, -15) and max_wait_s is None:
            # Flower's SuperNode exits on some transient server errors (an HTTP 500 while
            # pulling messages from an overloaded SuperLink): start it again, within limits.
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
            if len(crashes) <= MAX_CRASHES:
                _say(out, f"medfed client: site {site}: the SuperNode stopped (exit code {code}); "
                          f"starting it again in {REFUSED_PAUSE_S:g} s")
                time.sleep(REFUSED_PAUSE_S)
                continue
        if not refused:
            break
        # Refused keys: the server may still be registering the sites, or may not yet
        # have marked this site offline after a crash (Flower: up to a minute).
        first_refusal = first_refusal or time.monotonic()
        if time.monotonic() - first_refusal >= refused_for:
            break
        _say(out, f"medfed client: site {site}: the server refused this site's key; trying again in "
                  f"{REFUSED_PAUSE_S:g} s")
        time.sleep(REFUSED_PAUSE_S)
    if refused and insecure:
        raise DeployError(
            f"The server at {address} did not accept site {site} without TLS for {refused_for:g} s; a server "
            "started without --insecure needs TLS and the site's key: drop --insecure and give --certs."
        )
    if refused:
        raise DeployError(
            f"The server refused the key of site {site} for {refused_for:g} s: is {site!r} in the server's "
            "trusted_sites.txt, and is this the site's own folder from 'medfed certs'?"
        )
    if code not in (0, -2, -15):
        raise DeployError(
            f"The SuperNode of site {site} stopped {len(crashes)} times in {CRASH_WINDOW_S:g} s (last exit code "
            f"{code}); Flower's reason is above."
        )


def _run_supernode(command: list[str], env: dict[str, str], site: str, out) -> tuple[int, bool]:
    """Run the SuperNode until it exits, echoing its output; return (exit code, key refused)."""
    processes = ProcessSet(env)
    refused = threading.Event()

    def echo(stream) -> None:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace")
            if _REFUSED in line:
                refused.set()
            out.write(line)
            out.flush()

    reader = None
    try:
        with interrupt_on_sigterm():
            supernode = processes.start(command, stdout=subprocess.PIPE)
            # Read in a thread and wait here: the SuperNode's helpers keep the pipe open
            # after it exits, and watch for its pid to vanish, which needs this wait().
            reader = threading.Thread(target=echo, args=(supernode.stdout,), daemon=True)
            reader.start()
            code = supernode.wait()
    except KeyboardInterrupt:
        _say(out, f"medfed client: site {site}: stopping")
        raise
    finally:
        processes.stop()
        if reader is not None:
            reader.join(timeout=5)
    return code, refused.is_set()


#: What Flower's SuperNode prints when the SuperLink does not accept its key.
_REFUSED = "Exit Code: 305"
#: How long a refused site keeps trying by default, and the pause between tries (s).
REFUSED_RETRY_S = 120.0
REFUSED_PAUSE_S = 5.0
#: A SuperNode that stops unexpectedly is started again, unless it did so more than
#: MAX_CRASHES times within CRASH_WINDOW_S seconds.
MAX_CRASHES = 5
CRASH_WINDOW_S = 300.0


def _quoted(text: str) -> str:
    if '"' in text:
        raise DeployError(f"{text!r} must not contain a double quote (Flower's node config cannot carry it).")
    return text


def _say(out, text: str) -> None:
    print(text, file=out, flush=True)
