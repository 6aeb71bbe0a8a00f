"""Flower's task processes, as medfed starts them, run medfed's own app and no other."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import zipfile

import pytest
from flwr.cli.build import build_fab_from_disk

from medfed.config import ExperimentConfig, to_run_config
from medfed.deploy import app_guard
from medfed.deploy.app_guard import AppRefused, check_app
from medfed.deploy.processes import ProcessSet
from medfed.simulation.run import app_pyproject


def _fab(folder, pyproject: str, extra: dict[str, str] | None = None) -> bytes:
    """A FAB as ``flwr run`` builds it from ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    for name, text in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return build_fab_from_disk(folder)


@pytest.fixture
def medfed_pyproject() -> str:
    return app_pyproject(to_run_config(ExperimentConfig()))


def test_medfed_own_app_passes_at_a_site_and_at_the_server_that_wrote_it(tmp_path, medfed_pyproject):
    fab = _fab(tmp_path / "app", medfed_pyproject)
    check_app(fab)
    check_app(fab, expected_pyproject=(tmp_path / "app" / "pyproject.toml").read_bytes())
    # The app medfed server submits, named for what it is (a site's Flower names the app's folder after it).
    deployed = app_pyproject(to_run_config(ExperimentConfig()), deployed=True)
    assert 'name = "medfed-study"' in deployed and 'name = "medfed-simulation"' in medfed_pyproject
    fab = _fab(tmp_path / "deployed", deployed)
    check_app(fab)
    check_app(fab, expected_pyproject=(tmp_path / "deployed" / "pyproject.toml").read_bytes())


@pytest.mark.parametrize("extra", [
    {"evil.py": "import os\n"},
    # A copy of medfed's module inside the app would be imported before the installed one.
    {"medfed/client/client_app.py": "app = None\n"},
])
def test_an_app_with_code_of_its_own_is_refused(tmp_path, medfed_pyproject, extra):
    fab = _fab(tmp_path / "app", medfed_pyproject, extra)
    with pytest.raises(AppRefused, match=f"carries files of its own \\({next(iter(extra))}\\)"):
        check_app(fab)


def test_an_app_naming_other_components_is_refused(tmp_path, medfed_pyproject):
    pyproject = medfed_pyproject.replace("medfed.client.client_app:app", "os:system")
    with pytest.raises(AppRefused, match="its components are .*os:system"):
        check_app(_fab(tmp_path / "app", pyproject))


def test_the_server_refuses_medfeds_app_with_another_configuration(tmp_path, medfed_pyproject):
    ours = (tmp_path / "ours" / "pyproject.toml")
    ours.parent.mkdir()
    ours.write_text(medfed_pyproject, encoding="utf-8")
    theirs = medfed_pyproject.replace("\nrounds = 20\n", "\nrounds = 1000\n")
    assert theirs != medfed_pyproject
    fab = _fab(tmp_path / "app", theirs)
    check_app(fab)  # a site cannot tell: it knows no study configuration
    with pytest.raises(AppRefused, match="did not submit"):
        check_app(fab, expected_pyproject=ours.read_bytes())


def test_a_file_that_is_no_app_is_refused():
    with pytest.raises(AppRefused, match="not a readable Flower app bundle"):
        check_app(b"not a zip")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(".info/CONTENT", "")
    with pytest.raises(AppRefused, match="no pyproject.toml"):
        check_app(buffer.getvalue())


@pytest.mark.parametrize("executable", ["flwr-clientapp", "flwr-serverapp"])
def test_flowers_task_processes_check_the_app_before_installing_it(tmp_path, monkeypatch, medfed_pyproject,
                                                                   executable):
    import importlib

    runtime = importlib.import_module(app_guard._RUNTIME_MODULES[executable])
    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)  # restored after the test
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    app_guard._guard_installation(runtime, expected_pyproject=None)
    with pytest.raises(AppRefused):
        runtime.install_from_fab(_fab(tmp_path / "evil", medfed_pyproject, {"evil.py": ""}), skip_prompt=True)
    assert not (tmp_path / "home").exists()  # nothing of it was installed
    installed = runtime.install_from_fab(_fab(tmp_path / "ours", medfed_pyproject), skip_prompt=True)
    assert "clientapp = \"medfed.client.client_app:app\"" in (installed / "pyproject.toml").read_text(encoding="utf-8")


def test_every_flower_process_medfed_starts_finds_the_guarded_executables_first(tmp_path):
    processes = ProcessSet()
    try:
        folder = processes.guarded_apps
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        path = processes.env["PATH"].split(os.pathsep)
        assert path[0] == str(folder)
        # Flower's own processes, behind the guard (installed before Flower reads its arguments).
        for executable in ("flwr-serverapp", "flwr-clientapp"):
            shown = subprocess.run([executable, "--help"], env=processes.env, capture_output=True, text=True,
                                   timeout=120)
            assert shown.returncode == 0 and "--runtime-api-address" in shown.stdout, shown.stderr
        # Kinds of task medfed never runs are refused outright.
        refused = subprocess.run(["flwr-agentapp", "--token", "x"], env=processes.env, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 1
        assert "refused to start flwr-agentapp" in refused.stderr
    finally:
        processes.stop()
    assert not folder.exists()


def test_the_superlinks_runtime_api_hands_tasks_only_to_medfeds_superexec(tmp_path):
    # A stranger polling the Runtime API (on the study's one port) for the ServerApp task
    # took the whole study over when Flower started its own SuperExec: the SuperLink now
    # answers only a SuperExec holding the run folder's secret.
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient

    from medfed.deploy.certs import make_certs, server_certs
    from medfed.deploy.processes import free_port, wait_for_port
    from medfed.deploy.superlink import SUPEREXEC_SECRET, Address, new_superexec_secret, _superlink_command

    make_certs(tmp_path / "certs", "127.0.0.1", ["alpha"])
    tls = server_certs(tmp_path / "certs")
    home = tmp_path / "flower"
    home.mkdir()
    listen = Address("127.0.0.1", free_port())
    processes = ProcessSet()
    try:
        new_superexec_secret(home)
        assert oct((home / SUPEREXEC_SECRET).stat().st_mode & 0o777) == "0o600"
        link = processes.start(_superlink_command(listen, home, tls), log=home / "superlink.log")
        assert wait_for_port(listen.host, listen.port, 60.0, alive=lambda: link.poll() is None)
        stranger = RuntimeHttpClient.from_server_address(
            str(listen), insecure=False, root_certificates=str(tls.ca_cert),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
        with pytest.raises(Exception, match="401 Unauthorized"):
            stranger.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp"]))
    finally:
        processes.stop()


def test_the_server_refuses_a_run_whose_configuration_was_overridden(tmp_path, monkeypatch, medfed_pyproject):
    from flwr.common.config import flatten_dict
    import tomli

    from medfed.deploy.app_guard import EXPECTED_PYPROJECT_ENV, check_run_config

    written = tmp_path / "pyproject.toml"
    written.write_text(medfed_pyproject, encoding="utf-8")
    study = flatten_dict(tomli.loads(medfed_pyproject)["tool"]["flwr"]["app"]["config"])
    check_run_config({**study, "run-dir": "/etc"})  # simulation: nothing to compare with
    monkeypatch.setenv(EXPECTED_PYPROJECT_ENV, str(written))
    check_run_config(study)
    # flwr run --run-config 'run-dir="/etc"' with the study's own app: another folder to write to.
    with pytest.raises(AppRefused, match=r"differs from the study's \(run-dir\)"):
        check_run_config({**study, "run-dir": "/etc"})
    with pytest.raises(AppRefused, match=r"\(rounds\)"):
        check_run_config({**study, "rounds": 1000})


def test_a_python_file_in_the_working_folder_cannot_stand_in_for_a_module(tmp_path):
    # The task processes run where the site started medfed client: "python -m" would import
    # a flwr.py found there instead of Flower.
    (tmp_path / "flwr.py").write_text("raise SystemExit('imported from the working folder')\n")
    processes = ProcessSet()
    try:
        shown = subprocess.run(["flwr-clientapp", "--help"], env=processes.env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=120)
    finally:
        processes.stop()
    assert shown.returncode == 0 and "--runtime-api-address" in shown.stdout, shown.stderr


def test_the_server_stops_following_a_run_whose_superexec_died(tmp_path):
    # With its own SuperExec the server must notice it gone: the run would stay pending forever.
    from medfed.deploy.superlink import DeployError, _follow

    class Control:
        def run_status(self, run_id):
            return "pending"

    log = tmp_path / "superlink.log"
    log.write_text("INFO: Starting Flower SuperExec\nERROR: Failed to load SuperExec authentication secret\n")
    with pytest.raises(DeployError, match="SuperExec stopped during run 7: ERROR: Failed to load SuperExec"):
        _follow(Control(), 7, tmp_path, 3, io.StringIO(), alive=lambda: False, log=log)


def test_a_killed_medfed_processs_private_folder_is_removed_by_the_next_one(tmp_path, monkeypatch):
    # SIGKILL skips ProcessSet.stop(): the next medfed process removes the dead one's folder.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"medfed-apps-{dead.pid}-abc"
    alive = tmp_path / f"medfed-apps-{os.getpid()}-def"
    other = tmp_path / "medfed-apps-notapid-x"
    for folder in (orphan, alive, other):
        folder.mkdir()
    processes = ProcessSet()
    try:
        assert not orphan.exists() and alive.exists() and other.exists()
        assert processes.guarded_apps.parent == tmp_path
        assert processes.guarded_apps.name.startswith(f"medfed-apps-{os.getpid()}-")
    finally:
        processes.stop()
    assert not processes.guarded_apps.exists()
