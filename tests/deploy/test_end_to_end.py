"""`medfed certs`, `medfed server` and `medfed client` as real processes on 127.0.0.1.

Each test starts its processes in their own sessions with a marker in their
environment, bounds every wait, and in ``finally`` kills whatever still carries the
marker; it then asserts that nothing did (the commands must clean up after
themselves). Sites train ``medvit_v2_nano`` on a few generated 28 px images.

Timing: a round here costs a few seconds of Flower latency plus one ``flwr-clientapp``
process start per message (importing torch), far more than the training itself; on an
idle 2-core machine about 10-20 s. ``round_timeout_s`` must exceed the slowest honest
reply (``MEDFED_E2E_ROUND_TIMEOUT``, default 60 s; raise it on a loaded machine, where a
round took over 200 s). The dropout test is the slow one (a few minutes): it must wait
out the deadline for the killed site at least once, and a SIGKILLed SuperNode stays
"online" at the SuperLink for up to a minute (Flower's fixed 30 s heartbeat x 2), so it
may be sampled and waited for again in the evaluation phase.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from medfed.deploy.certs import TRUSTED_SITES, make_certs
from medfed.deploy.processes import free_port, marked_processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)")

REPO = Path(__file__).resolve().parents[2]
POISON = Path(__file__).resolve().parent / "_poison"
ROUND_TIMEOUT_S = float(os.environ.get("MEDFED_E2E_ROUND_TIMEOUT", "60"))
TEST_MARKER = "MEDFED_E2E_MARKER"


class Launcher:
    """Starts ``medfed`` commands as marked process groups and kills every trace of them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.marker = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], pythonpath: list[Path] = ()) -> subprocess.Popen:
        env = {
            **os.environ, TEST_MARKER: self.marker, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        with open(self.log(name), "ab") as out:
            # cwd: a site's default state folder (./medfed-state) and the like stay out of the repository.
            proc = subprocess.Popen([sys.executable, "-m", "medfed.cli", *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=self.folder)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace") if self.log(name).exists() else ""

    def wait(self, name: str, timeout_s: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout_s:.0f} s; its log:\n{self.text(name)[-4000:]}")

    def leftovers(self) -> list[int]:
        return [pid for pid in _marked(self.marker) if pid != os.getpid()]

    def kill_all(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _marked(marker: str) -> list[int]:
    return marked_processes(marker, env=TEST_MARKER)


def wait_until(predicate, timeout_s: float, what: str, launcher: Launcher, log: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; {log} log:\n"
                         f"{launcher.text(log)[-4000:]}")


def write_site(folder: Path, seed: int) -> Path:
    """A site folder with a tiny breastmnist.npz (28 px, 2 balanced classes)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 8), ("val", 2), ("test", 4)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 80, size=(n, 28, 28)) + 100 * labels[:, None, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(n, 1).astype(np.uint8)
    folder.mkdir(parents=True)
    np.savez(folder / "breastmnist.npz", **arrays)
    return folder


def write_experiment(path: Path, rounds: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "e2e", "seed": 0, "rounds": rounds,
        "data": {"dataset": "breastmnist", "root": None, "img_size": 28},
        "model": {"name": "medvit_v2_nano"},
        "train": {"local_epochs": 1, "batch_size": 8},
        "federation": {"num_sites": 3, "min_sites": 2, "round_timeout_s": ROUND_TIMEOUT_S, "round_retries": 1},
    }))
    return path


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


@pytest.fixture
def launcher(tmp_path):
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()


def client_args(site: str, port: int, tmp_path: Path, certs: Path) -> list[str]:
    return ["client", "--server", f"127.0.0.1:{port}", "--site", site, "--data", str(tmp_path / "data" / site),
            "--certs", str(certs / "sites" / site)]


EVIL_APP = """\
[project]
name = "evil"
version = "1.0.0"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "evil:server"
clientapp = "evil:client"
"""


def intrude(tmp_path: Path, port: int, ca_cert: Path) -> tuple[int, subprocess.CompletedProcess]:
    """What anyone who reaches the port can do with Flower's Control API: submit a run of
    their own app (its code, once imported, leaves a file in ``tmp_path/pwned``) and
    register a key of their own under a trusted site's name. Returns the run id and the
    registration's outcome."""
    home = tmp_path / "intruder"
    (home / "app").mkdir(parents=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "study"\n\n[superlink.study]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca_cert}"\n')
    (home / "app" / "pyproject.toml").write_text(EVIL_APP)
    pwned = tmp_path / "pwned"
    # Flower's CLI imports the app to check it, here: only a process medfed started counts.
    (home / "app" / "evil.py").write_text(
        "import os, pathlib\n"
        "if 'MEDFED_PROCESS_SET' in os.environ:\n"
        f"    pathlib.Path({str(pwned)!r}).mkdir(exist_ok=True)\n"
        f"    pathlib.Path({str(pwned)!r}, str(os.getpid())).write_text('ran')\n"
        "from flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n"
        "server = ServerApp()\nclient = ClientApp()\n")
    make_certs(home / "keys", "127.0.0.1", ["eve"])
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    flwr = str(Path(sys.executable).with_name("flwr"))
    submitted = subprocess.run([flwr, "run", str(home / "app"), "study", "--format", "json"], env=env,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = int(json.loads(submitted.stdout[submitted.stdout.index("{"):])["run-id"])
    registered = subprocess.run([flwr, "supernode", "register", str(home / "keys" / "sites" / "eve" / "site.pub"),
                                 "study", "--name", "beta"], env=env, capture_output=True, text=True, timeout=120)
    return run_id, registered


def test_tls_federation_rejects_a_poisoned_update_and_refuses_intruders(launcher, tmp_path):
    # Prepare: keys for four sites, of which the server trusts three; gamma replies NaN weights.
    certs = tmp_path / "certs"
    make_certs(certs, "127.0.0.1", ["alpha", "beta", "gamma", "mallory"])
    trusted = certs / TRUSTED_SITES
    trusted.write_text("".join(line + "\n" for line in trusted.read_text().splitlines()
                               if not line.endswith(" mallory")))
    for seed, site in enumerate(["alpha", "beta", "gamma", "mallory"]):
        write_site(tmp_path / "data" / site, seed)
    port = free_port()
    run_dir = tmp_path / "run"
    experiment = write_experiment(tmp_path / "exp.yaml", rounds=2)

    # Execute
    launcher.start("server", ["server", "--config", str(experiment), "--certs", str(certs),
                              "--address", f"127.0.0.1:{port}", "--run-dir", str(run_dir)])
    wait_until(lambda: "listening on" in launcher.text("server"), 120, "the server to listen", launcher, "server")
    launcher.start("alpha", client_args("alpha", port, tmp_path, certs))
    launcher.start("beta", client_args("beta", port, tmp_path, certs))
    launcher.start("gamma", client_args("gamma", port, tmp_path, certs), pythonpath=[POISON])
    launcher.start("mallory", client_args("mallory", port, tmp_path, certs) + ["--max-wait", "20"])
    launcher.start("insecure", ["client", "--server", f"127.0.0.1:{port}", "--site", "alpha", "--data",
                                str(tmp_path / "data" / "alpha"), "--insecure", "--max-wait", "20"])
    wait_until(lambda: "started; Flower's log" in launcher.text("server"), 180, "the run to start", launcher, "server")
    evil_run, registration = intrude(tmp_path, port, certs / "ca.crt")
    mallory_code = launcher.wait("mallory", 180)
    insecure_code = launcher.wait("insecure", 180)
    server_code = launcher.wait("server", 8 * ROUND_TIMEOUT_S)

    # Assert: two complete rounds, gamma's update rejected both times under its name.
    assert server_code == 0, launcher.text("server")[-4000:]
    records = events(run_dir)
    assert [r["round"] for r in records if r["event"] == "round"] == [1, 2]
    # gamma is left out of every round's aggregate: its update is rejected (or, on a machine
    # so loaded that it misses the deadline, it is dropped for that); never averaged in.
    left_out = {(r["round"], r["site"]): r["reason"] for r in records if r["event"] == "dropout"}
    assert {(1, "gamma"), (2, "gamma")} <= set(left_out)
    rejected = [reason for reason in left_out.values() if reason.startswith("update rejected")]
    assert rejected and all("NaN/inf" in reason for reason in rejected)
    trained = {(r["round"], r["site"]) for r in records if r["event"] == "site" and r["phase"] == "train"}
    assert {(1, "alpha"), (1, "beta"), (2, "alpha"), (2, "beta")} <= trained
    from medfed.server.checkpoint import load_arrays

    assert all(np.isfinite(v).all() for v in load_arrays(run_dir / "model.safetensors").values())
    # The intruders never joined: the untrusted key and the client without TLS gave up.
    assert mallory_code != 0 and insecure_code != 0
    assert "mallory" not in launcher.text("server")
    # ... but the coordinator was told, once, that an untrusted key tried (Flower only logs it).
    assert launcher.text("server").count("a site whose key is not in trusted_sites.txt tried to join") == 1
    assert "WARNING: --insecure" in launcher.text("insecure")
    assert "drop --insecure" in launcher.text("insecure")
    # The run and the key submitted through Flower's Control API were taken away, and none of
    # the intruder's code ran, on the server or at a site.
    server_log = launcher.text("server")
    assert f"stopped run {evil_run}, which this server did not submit" in server_log
    assert registration.returncode == 0, registration.stdout + registration.stderr
    assert "withdrew a key registered as beta that is not in trusted_sites.txt" in server_log
    # What the ServerApp checks each site's name against: the trusted registrations only.
    registered = json.loads((run_dir / "flower" / "registered_sites.json").read_text())
    assert sorted(registered.values()) == ["alpha", "beta", "gamma"]
    # Flower's state database (every site's replies) is the server account's alone.
    assert (run_dir / "flower").stat().st_mode & 0o777 == 0o700
    assert not (tmp_path / "pwned").exists()
    # The server's last line says where the results are.
    assert f"the study is finished; report {run_dir / 'report.html'}" in server_log
    # Each site's Flower installed the study's app in the site's state folder (./medfed-state), not in ~/.flwr.
    for site in ("alpha", "beta"):
        assert list((tmp_path / "medfed-state" / site / "flower" / "apps").glob("medfed.medfed-study.0.1.0.*")), site
    # Clients stop on SIGTERM and take their Flower processes with them.
    for site in ("alpha", "beta", "gamma"):
        os.killpg(launcher.procs[site].pid, signal.SIGTERM)
    for site in ("alpha", "beta", "gamma"):
        launcher.wait(site, 30)
    wait_until(lambda: not launcher.leftovers(), 15, "no process left", launcher, "server")


def test_a_site_killed_mid_round_rejoins_and_a_killed_server_resumes(launcher, tmp_path):
    # Prepare
    certs = tmp_path / "certs"
    make_certs(certs, "127.0.0.1", ["alpha", "beta", "gamma"])
    for seed, site in enumerate(["alpha", "beta", "gamma"]):
        write_site(tmp_path / "data" / site, seed)
    port = free_port()
    run_dir = tmp_path / "run"
    experiment = write_experiment(tmp_path / "exp.yaml", rounds=2)
    server_args = ["server", "--config", str(experiment), "--certs", str(certs), "--address", f"127.0.0.1:{port}",
                   "--run-dir", str(run_dir)]
    server = launcher.start("server", server_args)
    for site in ("alpha", "beta", "gamma"):
        launcher.start(site, client_args(site, port, tmp_path, certs))

    # Execute: beta dies (SIGKILL) once round 1's training messages are out ...
    wait_until(lambda: "Receiving: train" in launcher.text("beta"), 600, "beta's train message", launcher, "beta")
    os.killpg(launcher.procs["beta"].pid, signal.SIGKILL)
    # ... and the server dies (SIGKILL) once round 1 is complete.
    wait_until(lambda: any(r["event"] == "round" for r in events(run_dir)), 4 * ROUND_TIMEOUT_S,
               "round 1 to complete", launcher, "server")
    os.kill(server.pid, signal.SIGKILL)
    server.wait(10)
    # Flower's flwr-serverapp of the killed server may still be retrying: the resumed
    # server stops it (medfed.deploy.superlink._stop_previous_server) before it starts its own.
    # The hospital restarts beta with the same command; the resumed server waits for all
    # three sites (beta's key may be refused until its dead node is marked offline).
    launcher.start("beta-again", client_args("beta", port, tmp_path, certs))
    # A site may first finish the killed run's round-2 message it had already pulled, then
    # train the resumed round: the resume doubles the deadline (a resume may raise it).
    launcher.start("resumed", server_args + ["--resume", "--join-timeout", "150",
                                             "--set", f"federation.round_timeout_s={2 * ROUND_TIMEOUT_S:g}"])
    resumed_code = launcher.wait("resumed", 150 + 10 * ROUND_TIMEOUT_S)

    # Assert: round 1 completed without beta (recorded), round 2 ran after the restart,
    # with beta back.
    assert resumed_code == 0, launcher.text("resumed")[-4000:]
    records = events(run_dir)
    assert [r["round"] for r in records if r["event"] == "round"] == [1, 2]
    dropouts = {(r["round"], r["phase"], r["site"]): r["reason"] for r in records if r["event"] == "dropout"}
    assert (1, "train", "beta") in dropouts
    # No reply by the deadline, or Flower's "Node Unavailable" once beta's heartbeats stopped.
    assert dropouts[(1, "train", "beta")].startswith(("no reply within", "error reply"))
    starts = [r for r in records if r["event"] == "start"]
    assert starts[-1]["resumed_from_round"] == 1
    round_2 = {r["site"] for r in records if r["event"] == "site" and r["round"] == 2 and r["phase"] == "train"}
    assert {"alpha", "beta"} <= round_2, launcher.text("beta-again")[-4000:]
    # gamma, whose SuperNode lived through the server's death, trains round 2 or is recorded
    # as left out by name. Flower's SuperNode sometimes stays one message behind after its
    # server was killed (it first runs the dead run's pulled message; each reply then leaves
    # only when the next message arrives, past the deadline): seen in about 1 run in 6 here,
    # on quiet and loaded machines alike; restarting that client clears it (see the notes).
    if "gamma" not in round_2:
        assert (2, "train", "gamma") in dropouts, launcher.text("gamma")[-4000:]
    for site in ("alpha", "beta-again", "gamma"):
        os.killpg(launcher.procs[site].pid, signal.SIGTERM)
        launcher.wait(site, 30)
    wait_until(lambda: not launcher.leftovers(), 15, "no process left", launcher, "resumed")


def test_an_insecure_server_warns_runs_with_insecure_sites_and_leaves_out_a_site_unlike_the_study(launcher, tmp_path):
    # Prepare: no certificates at all; three sites, of which gamma's folder is valid on its
    # own (medfed client accepts it) but holds 64 px images in a 28 px study: only the
    # run's config tells.
    for seed, site in enumerate(["alpha", "beta"]):
        write_site(tmp_path / "data" / site, seed)
    gamma = tmp_path / "data" / "gamma" / "ward-7"
    gamma.mkdir(parents=True)
    from PIL import Image

    for i in range(6):
        Image.fromarray(np.full((64, 64), 40 * i, dtype=np.uint8)).save(gamma / f"{i}.png")
    (gamma / "labels.csv").write_text("filename,label,split\n" + "".join(
        f"{i}.png,{i % 2},{'test' if i >= 4 else 'train'}\n" for i in range(6)))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "e2e-insecure", "seed": 0, "rounds": 1,
        "data": {"dataset": "breastmnist", "root": None, "img_size": 28},
        "model": {"name": "medvit_v2_nano"}, "train": {"local_epochs": 1, "batch_size": 8},
        "federation": {"num_sites": 3, "min_sites": 2, "round_timeout_s": ROUND_TIMEOUT_S},
    }))
    port = free_port()
    run_dir = tmp_path / "run"

    # Execute
    launcher.start("server", ["server", "--config", str(experiment), "--insecure", "--address", f"127.0.0.1:{port}",
                              "--run-dir", str(run_dir)])
    for site, folder in (("alpha", tmp_path / "data" / "alpha"), ("beta", tmp_path / "data" / "beta"),
                         ("gamma", gamma)):
        launcher.start(site, ["client", "--server", f"127.0.0.1:{port}", "--site", site, "--data", str(folder),
                              "--insecure"])
    server_code = launcher.wait("server", 4 * ROUND_TIMEOUT_S)

    # Assert: both ends warned; the server named gamma and why, once, without its folder;
    # the round ran with the two others.
    server = launcher.text("server")
    assert server_code == 0, server[-4000:]
    assert "WARNING: --insecure" in server and "Using SuperLink" not in server  # Flower's line, not ours
    assert all("WARNING: --insecure" in launcher.text(site) for site in ("alpha", "beta", "gamma"))
    said = [line for line in server.splitlines() if "site gamma left out" in line]
    assert len(said) == 1 and "64x64 px images" in said[0] and "data.img_size is 28" in said[0], server[-4000:]
    assert "ward-7" not in server
    records = events(run_dir)
    assert [r["round"] for r in records if r["event"] == "round"] == [1]
    assert {r["site"] for r in records if r["event"] == "site" and r["phase"] == "train"} == {"alpha", "beta"}
    assert {r["site"] for r in records if r["event"] == "site"} == {"alpha", "beta"}
    assert not [r for r in records if r["event"] == "dropout"]
    # The site's own log has the whole story, folder included.
    assert "ward-7" in launcher.text("gamma") and "does not fit the study" in launcher.text("gamma")
    for site in ("alpha", "beta", "gamma"):
        os.killpg(launcher.procs[site].pid, signal.SIGTERM)
        launcher.wait(site, 30)
    wait_until(lambda: not launcher.leftovers(), 15, "no process left", launcher, "server")


def test_certs_refuses_to_overwrite_and_keeps_private_keys_private(tmp_path):
    # Prepare
    from medfed.cli import main

    # Execute
    first = main(["certs", "--out", str(tmp_path), "--server-host", "fl.example.org", "--sites", "a,b"])
    second = main(["certs", "--out", str(tmp_path), "--server-host", "fl.example.org", "--sites", "a,b"])

    # Assert
    assert (first, second) == (0, 2)
    for key in ("ca.key", "server.key", "sites/a/site.key", "sites/b/site.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "sites/a/ca.crt").read_bytes() == (tmp_path / "ca.crt").read_bytes()
