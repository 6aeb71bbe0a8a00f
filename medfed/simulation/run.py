"""Run an experiment on Flower's simulation engine (Ray backend), in this process.

(:func:`simulate` is also the entry of the in-process engine, ``simulation.engine:
inprocess``, which lives in :mod:`medfed.simulation.local`.)

How the simulation is launched (decided for the pinned ``flwr==1.42.0``)
------------------------------------------------------------------------
Flower 1.42 offers three ways in:

* ``flwr.simulation.run_simulation``: deprecated (it warns), and it has no run-config
  parameter: its ClientApps get an empty ``context.run_config``, so the ServerApp and
  ClientApp would need a second way to learn the experiment. Rejected.
* ``flwr run``: the recommended path, but it starts a detached SuperLink, builds and
  installs a FAB and runs the apps in further processes. The run is out of this
  process's hands (stopping it means stopping a SuperLink), start-up is slower, and a
  killed launcher leaves processes behind. Kept for users (``pyproject.toml`` carries
  ``[tool.flwr.app]``), not used by ``medfed simulate``.
* ``flwr.simulation.run_simulation._run_simulation``: the function Flower's own
  ``flwr-simulation`` process calls after pulling a run from the SuperLink. Given
  ``is_app=True`` and an app directory, each simulated SuperNode's context gets the
  run config of that directory's ``pyproject.toml`` (``[tool.flwr.app.config]``), and
  the ServerApp gets the context we pass. **Chosen**: in-process, blocking, exceptions
  propagate, nothing is left running, and server and clients read ``context.run_config``
  exactly as in deployment.

So :func:`simulate` writes a minimal Flower app ``pyproject.toml`` into a temporary
directory whose ``[tool.flwr.app.config]`` is ``to_run_config(cfg)``, and calls
``_run_simulation`` with medfed's ServerApp and ClientApp objects. The server's context
additionally carries ``run-dir`` and ``resume`` (server-only keys). The function is
private in Flower: it is pinned by the exact ``flwr`` version in ``pyproject.toml``,
and :func:`_check_flower_api` fails with one clear line if its signature changes.

``simulation.ray_address`` is passed to ``ray.init(address=...)``: the sites then run on
that cluster's workers (checked against a local cluster: same weights as a private Ray).

Ctrl-C: Flower runs the ServerApp in a non-daemon thread that a KeyboardInterrupt in the
main thread does not stop (sent to the whole process group, SIGINT used to leave the run
going to its last round). :func:`simulate` therefore handles SIGINT and SIGTERM itself:
the first one raises KeyboardInterrupt in the main thread (Flower then stops its
runtime and Ray) and arms a watchdog that shuts Ray down and ends the process
(exit 130) after a few seconds if anything still runs. The checkpoint of the last
complete round is written atomically, so ``--resume`` continues from it. ``ray.init``
installs its own SIGTERM handler (which aborts the process), so :func:`simulate` starts
Ray itself, before installing medfed's handlers, rather than leaving that to Flower.

Reproducibility: the sites seed themselves from ``(seed, round, site)``, use a fixed
number of torch threads (``simulation.cpus_per_site``), and the server aggregates replies
in site order; so the same config gives the same metrics on a CPU, and a resumed run
(``resume=True``) ends with the same weights as an uninterrupted one. With
``fraction_train`` or ``fraction_evaluate`` < 1, the sites of a round are drawn by site
name with a generator seeded by ``(seed, round, phase)``
(:class:`medfed.server.resume.RoundOffsetStrategy`), not from the node ids Flower draws at
every launch: the same sites take part on both engines and after a resume.
"""

from __future__ import annotations

import shutil

import inspect
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medfed.config import ExperimentConfig, to_run_config, with_absolute_paths
from medfed.errors import MedfedError

__all__ = ["SITE_STATE_FOLDER", "RayStartError", "app_pyproject", "resolve_engine", "resume_hint", "simulate"]

#: Folder of the run directory where simulated sites keep their local state per round.
SITE_STATE_FOLDER = "site-state"
#: Folder of the run directory holding the Flower app's ``pyproject.toml`` while Ray runs
#: (Flower reads the sites' run config from it). In the run folder, not in /tmp, so that
#: an interrupted or killed run leaves nothing outside its own folder.
APP_FOLDER = ".flower-app"
#: Seconds to wait for a Ray cluster named by ``simulation.ray_address`` to accept a connection.
RAY_CONNECT_TIMEOUT_S = 5.0


class RayStartError(MedfedError):
    """Ray cannot start on this machine, or cannot join the cluster ``simulation.ray_address`` names."""

#: medfed's Flower components, in every app it generates (:mod:`medfed.deploy.app_guard` runs no other).
SERVER_APP = "medfed.server.server_app:app"
CLIENT_APP = "medfed.client.client_app:app"


def simulate(cfg: ExperimentConfig, *, run_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Run (or resume) ``cfg`` as a simulated federation of ``cfg.federation.num_sites`` sites.

    The engine is :func:`resolve_engine`'s: ``"inprocess"`` runs the sites one after the
    other in this process (:func:`medfed.simulation.local.run_local`), ``"ray"`` on
    Flower's simulation engine as described in this module's docstring. Both end with the
    same weights.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    run_dir : str or Path, optional
        Run directory; default ``{cfg.output_dir}/{cfg.name}``.
    resume : bool
        Continue the run in ``run_dir`` from its last complete round. Its
        ``config.yaml`` must match ``cfg`` except that ``rounds`` may grow.

    Returns
    -------
    Path
        The run directory (``config.yaml``, ``metrics.jsonl``, ``checkpoint.safetensors``,
        ``model.safetensors``, ``report.html``).

    Raises
    ------
    medfed.server.resume.ResumeError
        A fresh run into a directory that holds one, or a resume that does not fit.
    medfed.server.run_lock.RunFolderInUse
        Another medfed process runs in ``run_dir``.
    """
    from medfed.server.resume import check_checkpoint_fits, check_run_dir
    from medfed.server.run_lock import run_folder_lock

    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
    run_dir = run_dir.expanduser().resolve()
    # The run folder records where its data is, wherever it is resumed from (a resume with
    # --config would otherwise write a relative root back).
    cfg = with_absolute_paths(cfg)
    check_run_dir(cfg, run_dir, resume)  # fail before Ray starts; the ServerApp checks again
    reference = _preflight(cfg)
    if resume:
        check_checkpoint_fits(run_dir, reference)
    engine = resolve_engine(cfg)
    # One medfed process per run folder (medfed.server.run_lock), from before anything is
    # written in it; checked again under the lock, for a run that another process began or
    # ended since the check above (a fresh run would clear its site state).
    with run_folder_lock(run_dir):
        check_run_dir(cfg, run_dir, resume)
        print(f"medfed simulate: engine {engine} (simulation.engine: {cfg.simulation.engine})", flush=True)
        if engine == "inprocess":
            from medfed.simulation.local import run_local

            with _stop_on_interrupt(run_dir):  # SIGTERM too: a message and exit 130, as on Ray
                return run_local(cfg, run_dir=run_dir, resume=resume)  # writes the site preview too
        _simulate_on_ray(cfg, run_dir, resume)
    return run_dir


def _simulate_on_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    """:func:`simulate` on Flower's simulation engine (this module's docstring)."""
    from medfed.sites.preview import preview_run_sites

    preview_run_sites(cfg, run_dir)  # the report shows the sites (the server never loads images)
    _set_thread_env(cfg)

    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from medfed.client.client_app import app as client_app
    from medfed.client.site_state import SITE_STATE_DIR_KEY
    from medfed.server.server_app import RESUME_KEY, RUN_DIR_KEY
    from medfed.sites.profiles import num_nodes
    from medfed.server.server_app import app as server_app

    _check_flower_api(_run_simulation)
    server_run_config = {**to_run_config(cfg), RUN_DIR_KEY: str(run_dir), RESUME_KEY: bool(resume)}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=server_run_config)
    if not resume:  # a fresh run must not find an older run's site state
        shutil.rmtree(run_dir / SITE_STATE_FOLDER, ignore_errors=True)
    app_dir = run_dir / APP_FOLDER
    app_dir.mkdir(parents=True, exist_ok=True)
    client_run_config = {**to_run_config(cfg), SITE_STATE_DIR_KEY: str(run_dir / SITE_STATE_FOLDER)}
    (app_dir / "pyproject.toml").write_text(app_pyproject(client_run_config), encoding="utf-8")
    # Ray first: ray.init replaces SIGTERM's handler, so ours must be installed after it.
    try:
        with _ray_started(cfg), _stop_on_interrupt(run_dir):
            _run_simulation(
                num_supernodes=num_nodes(cfg.federation),  # training sites plus held-out sites
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server_app,
                backend_name="ray",
                backend_config=_backend_config(cfg),
                server_app_context=context,
                app_dir=str(app_dir),
                is_app=True,
            )
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def resolve_engine(cfg: ExperimentConfig) -> str:
    """The engine :func:`simulate` runs ``cfg`` on: ``"inprocess"`` or ``"ray"``.

    ``simulation.engine`` when it names one; for ``"auto"`` (the default) the rule below,
    from ``benchmarks/bench_federation.py`` (``docs/performance.md``). Both engines end
    with the same weights, so the rule changes only the time a run takes.

    ==========================================================  ===========
    ``auto`` and ...                                            engine
    ==========================================================  ===========
    ``ray_address`` set (join a cluster)                        ray
    sites use a GPU (``gpus_per_site > 0``) and one is visible  inprocess
    sites use GPUs and several are visible                      ray
    CPU, fewer than 2 sites fit at once (``min(num_sites,       inprocess
    cores // cpus_per_site) < 2``): Ray would only add start-up
    CPU, 2 or more sites at once                                ray
    ==========================================================  ===========

    On 2 cores with one CPU per site, the default 20-round federation ran faster on Ray
    (parallel sites repay its 13-18 s start-up); short CPU runs are faster in-process:
    set ``simulation.engine: inprocess`` for those.
    """
    sim = cfg.simulation
    if sim.engine != "auto":
        return sim.engine
    if sim.ray_address:
        return "ray"
    if sim.gpus_per_site > 0:
        return "inprocess" if _visible_gpus() <= 1 else "ray"
    parallel_sites = min(cfg.federation.num_sites, int(_available_cpus() // sim.cpus_per_site))
    return "ray" if parallel_sites >= 2 else "inprocess"


#: Seconds between Ctrl-C and the forced end of a simulation that did not stop by itself.
INTERRUPT_GRACE_S = 5.0


def resume_step(run_dir: str | Path) -> str:
    """How to go on with a stopped simulation: ``continue with medfed simulate --resume ...``."""
    quoted = shlex.quote(str(run_dir))
    return f"continue with medfed simulate --resume {quoted} (medfed report {quoted} reports the rounds done)"


def resume_hint(run_dir: str | Path) -> str:
    """What ``medfed simulate`` prints when a signal stops it."""
    return f"medfed: interrupted; {resume_step(run_dir)}"


@contextmanager
def _stop_on_interrupt(run_dir: Path) -> Iterator[None]:
    """SIGINT/SIGTERM: KeyboardInterrupt now, and a forced exit (130) after ``INTERRUPT_GRACE_S``.

    The KeyboardInterrupt leaves the block (as does any exception raised after the signal)
    and the CLI prints the same line (:func:`resume_step`); the forced exit then only ends threads that
    Flower leaves running. When the main thread is
    still in the block at the forced exit, the forced exit prints the hint: after SIGTERM
    to the process group, Ray's own processes are gone and Ray's shutdown waits for them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    left = threading.Event()

    def handler(_signum, _frame) -> None:
        if not getattr(handler, "armed", False):
            handler.armed = True
            threading.Thread(target=_force_exit, args=(left, run_dir), name="medfed-interrupt-watchdog",
                             daemon=True).start()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception as error:
        if getattr(handler, "armed", False):
            # Stopping can fail in ways of its own (Ray's processes got the signal too, and
            # Flower re-raises what its threads met), replacing the KeyboardInterrupt: the
            # run was interrupted all the same.
            raise KeyboardInterrupt from error
        raise
    finally:
        left.set()
        for sig, old in previous.items():
            # Once interrupted, the run is ending (the watchdog exits at the latest): a
            # further signal, such as a second one to the process group while Ray stops,
            # must not reach the handler that was there before, Ray's sys.exit(1).
            signal.signal(sig, signal.SIG_IGN if getattr(handler, "armed", False) else old)


def _force_exit(left: threading.Event, run_dir: Path) -> None:
    time.sleep(INTERRUPT_GRACE_S)
    if not left.is_set():
        print(resume_hint(run_dir), file=sys.stderr)
    try:
        import ray

        ray.shutdown()  # stops the local Ray cluster this process started (workers, raylet, GCS)
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(130)


def _backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    # No "init_args": Ray is already up (_ray_started), so Flower does not call ray.init.
    return {"client_resources": {"num_cpus": cfg.simulation.cpus_per_site, "num_gpus": cfg.simulation.gpus_per_site}}


@contextmanager
def _ray_started(cfg: ExperimentConfig) -> Iterator[None]:
    """Start (or join) Ray with the arguments Flower's ``RayBackend.init_ray`` uses; shut it down after.

    Left to Flower, ``ray.init`` runs inside ``_run_simulation``, after
    :func:`_stop_on_interrupt` has installed medfed's handlers, and replaces SIGTERM's
    with Ray's C++ failure handler, which aborts the process (exit 134, no resume hint).
    Started here, Ray is left alone by Flower (it skips ``ray.init`` when Ray is
    initialised) and medfed's handlers are installed after it. Flower's backend shuts Ray
    down at the end of a run; the shutdown here covers a run that failed before that.
    """
    import ray

    in_main_thread = threading.current_thread() is threading.main_thread()
    sigterm_before = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    if not ray.is_initialized():
        # Ray's workers inherit the environment but not this process's sys.path (as in Flower).
        pythonpath = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath
        try:
            with warnings.catch_warnings():
                # Ray's tip that it may one day stop hiding GPUs from sites with num_gpus=0
                # is addressed to Ray's developers: the ClientApp itself keeps a site with
                # gpus_per_site 0 on the CPU, and the tip printed in every run.
                warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
                # logging_level and log_to_driver: Flower's defaults (ray's INFO lines are noise here).
                ray.init(address=cfg.simulation.ray_address, include_dashboard=False, logging_level="WARNING",
                         log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        except ConnectionError as err:  # ray_address "auto" with no cluster on this machine
            raise RayStartError(
                f"Config key 'simulation.ray_address': Ray found no cluster to join at "
                f"{cfg.simulation.ray_address!r}; start one with 'ray start --head', or remove ray_address to "
                "run on this machine."
            ) from err
        except OSError as err:
            if "AF_UNIX path length" not in str(err):
                raise
            # Ray keeps its sockets under RAY_TMPDIR, else TMPDIR, else /tmp; a batch
            # scheduler's per-job TMPDIR can be too deep for a socket's 107-byte limit.
            socket_path = str(err).rpartition(": ")[2]
            raise RayStartError(
                f"Ray cannot start: its socket path {socket_path} is longer than the system allows (107 bytes); "
                "set RAY_TMPDIR to a short folder (RAY_TMPDIR=/tmp), or use simulation.engine: inprocess."
            ) from err
    try:
        yield
    finally:
        ray.shutdown()
        if sigterm_before is not None:
            # ray.init installed its own SIGTERM handler (stop Ray's processes, then
            # sys.exit(1)); it must not outlive Ray.
            signal.signal(signal.SIGTERM, sigterm_before)


def _set_thread_env(cfg: ExperimentConfig) -> None:
    # Ray workers inherit the driver's environment: fix the BLAS/OpenMP thread count
    # per site (the ClientApp also calls torch.set_num_threads) so reductions split
    # the same way in every run.
    threads = str(max(1, int(cfg.simulation.cpus_per_site)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, threads)


def _preflight(cfg: ExperimentConfig, *, simulated: bool = True) -> dict[str, Any]:
    """Check names and, for a simulation, data before the run starts (each raises a one-line error);
    return the initial model arrays (a resume checks its checkpoint against them).

    A simulation's dataset file is read and validated here, and dealt to the sites, as
    every site will: a missing, corrupt or mis-shaped file, or a split too small for the
    sites, otherwise fails at each site, and the run folder it leaves behind can be
    neither resumed nor started afresh. A deployed server (``simulated=False``) needs no
    data: the sites bring their own.
    """
    from medfed.client.site_data import load_dataset_once
    from medfed.config import ConfigError
    from medfed.models import list_models
    from medfed.server.server_app import build_strategy

    if cfg.model.name not in list_models():
        raise ConfigError(
            f"Config key 'model.name' must be one of {', '.join(list_models())}. Got {cfg.model.name!r} instead."
        )
    strategy = build_strategy(cfg)
    # Built once here, as the ServerApp will: weights that do not fit the model, FairLoRA
    # targets that match no layer, or FairLoRA without a backbone fail now, not after the
    # run folder exists (or, in deployment, after the server opened its port).
    from medfed.server.server_app import initial_model_arrays

    reference = initial_model_arrays(cfg, strategy)
    from medfed.sites.profiles import deal_sites, plan_for

    plan = plan_for(cfg)  # class mixes and colour corruptions fit the dataset
    if not simulated:
        return reference
    if cfg.data.root is not None:
        from medfed.data import DatasetNotFoundError
        from medfed.data.medmnist_files import medmnist_filename, medmnist_url

        path = Path(cfg.data.root).expanduser() / medmnist_filename(cfg.data.dataset, cfg.data.img_size)
        if not path.is_file():
            # Not downloaded here: a mistyped root would receive the file, and each run would fetch it anew.
            embedded = "; null for the embedded copy" if (cfg.data.dataset, cfg.data.img_size) == ("breastmnist", 28) else ""
            raise DatasetNotFoundError(
                f"Config key 'data.root' points to {path.parent}, which has no {path.name}; put the file there "
                f"(from {medmnist_url(cfg.data.dataset, cfg.data.img_size)}), or set data.root to the folder that "
                f"holds it{embedded}."
            )
    splits = load_dataset_once(cfg.data.dataset, cfg.data.root, cfg.data.img_size)  # cached: in-process sites reuse it
    deal_sites(plan, splits["train"].labels, splits["test"].labels, cfg.seed)  # every site gets images of both splits
    if cfg.simulation.ray_address:
        _check_ray_address(cfg.simulation.ray_address)
    elif resolve_engine(cfg) == "ray":
        _check_site_resources(cfg)
    return reference


def _check_site_resources(cfg: ExperimentConfig) -> None:
    """On a Ray started here, a site must fit the machine: Ray would find no worker to run
    it on (tracebacks, then a ServerApp that waits for sites for good)."""
    from medfed.config import ConfigError

    sim = cfg.simulation
    for key, wanted, present, what in (("cpus_per_site", sim.cpus_per_site, _available_cpus(), "CPU cores"),
                                       ("gpus_per_site", sim.gpus_per_site, _visible_gpus(), "GPUs")):
        if wanted > present:
            raise ConfigError(
                f"Config key 'simulation.{key}' is {wanted:g} but this machine has {present} {what} for Ray; give at "
                f"most {present}, or simulation.engine: inprocess."
            )


def _check_ray_address(address: str) -> None:
    """Fail within seconds when ``host:port`` does not answer: ``ray.init`` retries for minutes.

    Other forms (``auto``, ``ray://...``) are left to ``ray.init``.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()  # [::1]:6379
    except OSError as err:
        why = err.strerror or str(err) or "no answer"
        raise RayStartError(
            f"Config key 'simulation.ray_address': no Ray cluster answers at {address} ({why}); start one there "
            f"with 'ray start --head --port {port}', or remove ray_address to run on this machine."
        ) from err


def _check_flower_api(function: Any) -> None:
    expected = {"num_supernodes", "exit_event", "client_app", "server_app", "backend_name", "backend_config",
                "server_app_context", "app_dir", "is_app"}
    missing = expected - set(inspect.signature(function).parameters)
    if missing:
        raise RuntimeError(
            f"This flwr version's _run_simulation lacks {sorted(missing)}; medfed needs flwr==1.42.0 "
            "(pip install 'flwr[simulation]==1.42.0')."
        )


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a TOML basic string: JSON's escapes are valid TOML


def app_pyproject(run_config: dict[str, bool | int | float | str], *, deployed: bool = False) -> str:
    """A minimal Flower app ``pyproject.toml`` whose run config is ``run_config``.

    Parameters
    ----------
    run_config : dict
        Flat, dotted kebab-case keys (``to_run_config``); written as TOML dotted keys,
        which Flower flattens back to the same names.
    deployed : bool
        The app ``medfed server`` submits to the sites ("medfed-study"; Flower names the
        folder a site installs it in after it), not the simulation's ("medfed-simulation").
        Nothing checks the name (:mod:`medfed.deploy.app_guard` checks the components and,
        on the coordinator, the whole file against the one the server wrote).
    """
    name, description = (("medfed-study", "medfed study run by medfed server on the sites' SuperNodes") if deployed
                         else ("medfed-simulation", "medfed experiment run on the Flower simulation engine"))
    lines = [
        "[project]",
        f'name = "{name}"',
        'version = "0.1.0"',
        f'description = "{description}"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "medfed"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{CLIENT_APP}"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml_value(value)}" for key, value in run_config.items()),
        "",
    ]
    return "\n".join(lines)
