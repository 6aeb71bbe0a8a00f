"""Only medfed's own app runs at a site or on the coordinator: a guard on Flower's task processes.

Flower 1.42's Control API shares the SuperLink's one port and has no login. Whoever
reaches the port can submit a run with an app of their own (a FAB: a zip of a
``pyproject.toml`` and any Python files), and Flower would execute its ServerApp on the
coordinator and its ClientApp at every connected site: their code, next to the
hospital's images.

So ``medfed server`` and ``medfed client`` put a folder of their own first on the PATH of
the SuperLink and the SuperNode (:func:`write_guarded_executables`). Flower starts a
run's code through executables it finds by name (``flwr-serverapp``, ``flwr-clientapp``,
and ``flwr-agentapp``, ``flwr-connector``, ``flwr-model``, ``flwr-simulation`` for kinds
medfed never uses); the ones in that folder run :func:`main` here instead. For a ServerApp or a ClientApp,
:func:`main` starts Flower's own process with its app installation checked first by
:func:`check_app`:

- the app holds ``pyproject.toml`` and nothing else (no code of its own, which Flower
  would import before the installed medfed);
- its components are medfed's ServerApp and ClientApp;
- on the coordinator, its ``pyproject.toml`` is, table for table, the one this server
  wrote and submitted (``MEDFED_APP_PYPROJECT``), and so is the run's configuration
  with its overrides (:func:`check_run_config`, called by the ServerApp), so that no
  other experiment runs in this study's run folder.

Two more holes of the shared port are closed elsewhere: ``medfed server`` gives the
SuperLink a SuperExec of its own with a secret (a stranger could otherwise take the
run's ServerApp task through the Runtime API), and stops runs and withdraws keys it did
not make (:class:`medfed.deploy.superlink._SuperLinkWatch`).

An app that fails is not installed: the task fails with one line naming why, in the
site's or the server's output. Every other kind of task is refused outright. Flower's
own ``flwr run`` of a researcher's project (``flwr run .``) is not affected: it never
starts a medfed server or client.
"""

from __future__ import annotations

import importlib
import io
import os
import shlex
import sys
import zipfile
from pathlib import Path

from medfed.errors import MedfedError
from medfed.simulation.run import CLIENT_APP, SERVER_APP

__all__ = ["AppRefused", "EXPECTED_PYPROJECT_ENV", "check_app", "check_run_config", "main", "write_guarded_executables"]

#: Where the coordinator's guard finds the ``pyproject.toml`` of the run this server submitted.
EXPECTED_PYPROJECT_ENV = "MEDFED_APP_PYPROJECT"
#: The files of medfed's generated app, as Flower bundles it (``.info/CONTENT`` lists the others' hashes).
_APP_FILES = {"pyproject.toml", ".info/CONTENT"}
#: Flower's task executors, started by name from PATH: the two medfed runs, behind the guard...
_GUARDED = {"flwr-serverapp": "serverapp", "flwr-clientapp": "clientapp"}
#: The modules whose ``install_from_fab`` installs a run's app in each (their packages export a function of that name).
_RUNTIME_MODULES = {"flwr-serverapp": "flwr.superlink.runtime.run_serverapp",
                    "flwr-clientapp": "flwr.supernode.runtime.run_clientapp"}
#: ... and the kinds it never runs.
_REFUSED = ("flwr-agentapp", "flwr-connector", "flwr-model", "flwr-simulation")


class AppRefused(MedfedError):
    """A run's app is not medfed's own; nothing of it was installed or run."""


def check_app(fab: bytes, expected_pyproject: bytes | None = None) -> None:
    """Refuse a Flower app bundle (FAB) that is not medfed's own.

    Parameters
    ----------
    fab : bytes
        The FAB, a zip archive, as Flower received it with the run.
    expected_pyproject : bytes, optional
        The ``pyproject.toml`` the app must hold, table for table (the coordinator's, for
        the run it submitted); None accepts any run configuration of medfed's app (a site).

    Raises
    ------
    AppRefused
        One line: what the app holds that medfed's does not.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, RuntimeError) as err:
        raise AppRefused(f"refused a run whose app is not a readable Flower app bundle ({err}).") from None
    extra = sorted(set(names) - _APP_FILES)
    if extra or "pyproject.toml" not in names:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise AppRefused(
            f"refused a run whose app is not medfed's: it carries files of its own ({shown or 'no pyproject.toml'}); "
            "medfed runs only the ServerApp and ClientApp installed with it. Someone who can reach the server's "
            "port submitted it: see 'Network' in the README."
        )
    import tomli  # Flower's TOML reader (a dependency of flwr), as it reads the app
    from flwr.common.config import get_fab_config

    try:
        config = get_fab_config(fab)
        components = config["tool"]["flwr"]["app"]["components"]
    except (ValueError, KeyError, TypeError) as err:
        raise AppRefused(f"refused a run whose app has no valid Flower configuration ({err}).") from None
    wanted = {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    if dict(components) != wanted:
        raise AppRefused(
            f"refused a run whose app is not medfed's: its components are {dict(components)}, not {wanted}. "
            "Someone who can reach the server's port submitted it: see 'Network' in the README."
        )
    # Flower rewrites pyproject.toml as it bundles the app: the parsed tables are compared.
    if expected_pyproject is not None and config != tomli.loads(expected_pyproject.decode("utf-8")):
        raise AppRefused(
            "refused a run that this medfed server did not submit (its configuration differs from the study's); "
            "someone who can reach the server's port submitted it: see 'Network' in the README."
        )


def check_run_config(run_config: dict) -> None:
    """On the coordinator, refuse a run whose configuration is not exactly the study's.

    :func:`check_app` sees the app; a run also carries overrides (``flwr run
    --run-config``), which Flower merges into the ServerApp's run config: a run of the
    study's own app could otherwise name another run folder or strategy. Nothing is
    checked where ``MEDFED_APP_PYPROJECT`` is not set (simulation, ``flwr run .``).

    Raises
    ------
    AppRefused
        The run config differs from the ``[tool.flwr.app.config]`` this server wrote.
    """
    path = os.environ.get(EXPECTED_PYPROJECT_ENV)
    if not path:
        return
    import tomli
    from flwr.common.config import flatten_dict

    written = tomli.loads(Path(path).read_text(encoding="utf-8"))["tool"]["flwr"]["app"].get("config", {})
    expected = flatten_dict(written)
    if dict(run_config) != expected:
        changed = sorted(key for key in set(run_config) | set(expected) if run_config.get(key) != expected.get(key))
        raise AppRefused(
            f"refused a run whose configuration differs from the study's ({', '.join(changed[:5])}): this medfed "
            "server did not submit it; someone who can reach the server's port did (see 'Network' in the README)."
        )


def write_guarded_executables(folder: str | Path) -> Path:
    """Write into ``folder`` the executables that stand in for Flower's task processes; return it.

    :class:`medfed.deploy.processes.ProcessSet` puts ``folder`` first on the PATH of every
    Flower process medfed starts.
    """
    folder = Path(folder)
    python = shlex.quote(sys.executable)
    # Not "python -m", which puts the working folder first on sys.path: any .py file
    # where the site started medfed client could then stand in for a module medfed imports.
    start = shlex.quote("import sys; sys.path = [p for p in sys.path if p != '']; "
                        "from medfed.deploy.app_guard import main; main()")
    for executable in (*_GUARDED, *_REFUSED):
        path = folder / executable
        path.write_text(f'#!/bin/sh\nexec {python} -c {start} {executable} "$@"\n', encoding="utf-8")
        path.chmod(0o755)
    return folder


def _guard_installation(runtime, expected_pyproject: bytes | None) -> None:
    """Make Flower's task process ``runtime`` check a run's app before it installs it."""
    install = runtime.install_from_fab  # AttributeError (no task runs at all) if Flower moved it

    def checked_install(fab_file, *args, **kwargs):
        if not isinstance(fab_file, bytes):
            fab_file = Path(fab_file).read_bytes()
        try:
            check_app(fab_file, expected_pyproject)
        except AppRefused as err:
            print(f"medfed: {err}", file=sys.stderr, flush=True)
            raise
        return install(fab_file, *args, **kwargs)

    runtime.install_from_fab = checked_install


def main(argv: list[str] | None = None) -> None:
    """Flower's task process ``NAME``, guarded (``sys.argv``: ``[.., NAME, ARGS...]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv else ""
    if name not in _GUARDED:
        print(f"medfed: refused to start {name or 'a task'}: medfed runs only its own ServerApp and ClientApp.",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    expected_path = os.environ.get(EXPECTED_PYPROJECT_ENV)
    expected = Path(expected_path).read_bytes() if expected_path else None
    sys.argv = [name, *argv]
    if _GUARDED[name] == "clientapp":
        from flwr.supernode.cli import flwr_clientapp as start
    else:
        from flwr.superlink.cli import flwr_serverapp as start
    _guard_installation(importlib.import_module(_RUNTIME_MODULES[name]), expected)
    start()


if __name__ == "__main__":
    main()
