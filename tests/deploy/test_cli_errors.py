"""Mistakes with `medfed server` / `medfed client` end in one line and exit 2, before anything starts."""

import json

import pytest

from medfed.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["server", "--certs", "{tmp}/nowhere", "--run-dir", "{tmp}/run"], "does not exist; create it with 'medfed certs"),
    (["server", "--run-dir", "{tmp}/run"], "needs --certs DIR"),
    (["server", "--resume"], "--resume needs --run-dir"),
    (["server", "--insecure", "--address", "nonsense", "--run-dir", "{tmp}/run"], "HOST:PORT"),
    (["client", "--server", "h:1", "--site", "a", "--data", "{tmp}/nodata", "--certs", "{tmp}"], "does not exist"),
    (["client", "--server", "h:1", "--site", "a/b", "--data", "{tmp}", "--certs", "{tmp}"], "Site name 'a/b'"),
    (["client", "--server", "h", "--site", "a", "--data", "{tmp}", "--certs", "{tmp}"], "HOST:PORT"),
])
def test_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    # Execute
    code = main([arg.format(tmp=tmp_path) for arg in argv])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err


def test_a_server_on_a_port_in_use_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    # Another program (or another study's server) listens on the port: waiting for the
    # port to answer took it for this server's SuperLink.
    import socket
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a ProcessSet's folder would go

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code = main(["server", "--insecure", "--address", f"127.0.0.1:{port}", "--run-dir", str(tmp_path / "run"),
                     "--set", "federation.num_sites=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].endswith(f"Port {port} on 127.0.0.1 is in use (Address already in use), by another program or "
                            "another medfed server; stop it, or give this server another --address.")
    assert not list(tmp_path.glob("medfed-apps-*"))  # a refused start leaves no temporary folder behind


def test_a_run_stopped_by_the_quorum_names_the_whole_resume_command(tmp_path):
    # The server's own stop (3 missed quorums) told only --resume --run-dir, and the
    # server then refused to start without --certs.
    import json

    from medfed.deploy.superlink import DeployError, _check_finished, resume_command

    run = tmp_path / "my run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(
        {"event": "quorum_missed", "round": 2, "sites": 1, "stage": "replied", "needed": 2, "attempt": 3}) + "\n")
    command = resume_command(run, certs=tmp_path / "certs", address="0.0.0.0:9999", join_timeout_s=60.0)
    with pytest.raises(DeployError) as err:
        _check_finished(run, tmp_path / "home", command)
    assert (f"Resume it with: medfed server --resume --run-dir '{run}' --certs {tmp_path / 'certs'} "
            "--address 0.0.0.0:9999 --join-timeout 60 (log:") in str(err.value)


def test_the_join_counter_says_when_more_sites_joined_than_expected():
    # Held-out sites and spare keys join beyond federation.num_sites: it read "(3/2)".
    import io

    from medfed.deploy.superlink import _wait_for_sites

    class Control:
        def online(self):
            return {1: "alpha", 2: "beta", 3: "gamma"}

    out = io.StringIO()
    _wait_for_sites(Control(), 2, 2, 5.0, out)
    assert out.getvalue().splitlines()[1:] == [
        "medfed server: site alpha joined (1/2)", "medfed server: site beta joined (2/2)",
        "medfed server: site gamma joined (3 connected, 2 expected)",
    ]


def test_sites_left_out_and_taken_back_are_said_and_a_stop_for_want_of_them_is_named(tmp_path):
    from medfed.deploy.superlink import DeployError, _check_finished, _progress_line

    left = {"event": "site_left_out", "round": 1, "site": "gamma", "reason": "the site's data does not fit the study: x"}
    assert _progress_line(left, 3) == ("medfed server: site gamma left out of the run: the site's data does not fit "
                                       "the study: x (asked again while the run goes on)")
    assert _progress_line({"event": "site_admitted", "round": 2, "site": "gamma"}, 3) == (
        "medfed server: site gamma's data now fits the study; it takes part from this round")
    # A run stopped before round 1 says why, not Flower's last log line.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "start", "resumed_from_round": 0}, left,
        {"event": "stopped", "reason": "only 2 site(s) have data that fits the study"},
    ]) + "\n")
    with pytest.raises(DeployError, match=r"^The run did not finish: only 2 site\(s\) have data that fits the study\. "
                                          r"Resume it with: medfed server --resume"):
        _check_finished(run_dir, tmp_path / "flower", "medfed server --resume --run-dir run")


def test_a_diverged_round_is_printed_as_nan_not_a_crash(tmp_path):
    # A diverged round's loss and an undefined AUC are null in metrics.jsonl (standard JSON);
    # medfed server's progress printed them with :.4f, which a None would stop.
    import io

    from medfed.deploy.superlink import _print_progress
    from medfed.server.metrics_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).write({"event": "round", "round": 2, "wall_time_s": 3.0, "train": {"loss": float("inf")},
                            "evaluate": {"acc": 0.5, "auc": float("nan")}})
    out = io.StringIO()
    offset = _print_progress(path, 0, 5, out)
    assert offset == path.stat().st_size
    assert out.getvalue().splitlines()[-1].endswith(
        "round 2/5 done in 3.0 s, train loss nan, test acc 0.5000 auc nan")


def test_the_join_counter_counts_the_sites_online_now_and_says_who_left():
    # A site that left while another joined was still counted: "(2/2)" with one site online.
    import io

    from medfed.deploy.superlink import _wait_for_sites

    class Control:
        polls = iter([{1: "alpha"}, {2: "beta"}, {2: "beta", 3: "gamma"}])

        def online(self):
            return next(self.polls)

    out = io.StringIO()
    _wait_for_sites(Control(), 2, 2, 5.0, out)
    assert out.getvalue().splitlines()[1:] == [
        "medfed server: site alpha joined (1/2)", "medfed server: site alpha left (0/2)",
        "medfed server: site beta joined (1/2)", "medfed server: site gamma joined (2/2)",
    ]



def test_a_deployed_run_whose_every_site_diverged_is_not_told_to_resume(tmp_path):
    from medfed.deploy.superlink import DeployError, _check_finished

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    diverged = "error reply: SiteFailure: TrainingDivergedError at the site; the site's log has the details"
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "start", "resumed_from_round": 0},
        {"event": "dropout", "round": 1, "phase": "train", "site": "alpha", "reason": "no reply within 60 s"},
        {"event": "quorum_missed", "round": 1, "sites": 0, "stage": "replied", "needed": 2, "attempt": 1},
        {"event": "start", "resumed_from_round": 0},  # the retry: only its dropouts count
        {"event": "dropout", "round": 1, "phase": "train", "site": "alpha", "reason": diverged},
        {"event": "dropout", "round": 1, "phase": "train", "site": "beta",  # finite loss, NaN weights after its step
         "reason": "update rejected: array 'head.weight' holds 3 NaN/inf values"},
        {"event": "quorum_missed", "round": 1, "sites": 0, "stage": "replied", "needed": 2, "attempt": 2},
    ]) + "\n")
    with pytest.raises(DeployError, match=r"2 time\(s\) in a row\. Every site's training diverged \(a NaN or infinite loss or "
                                          r"update\): start a new run \(another name or output_dir\) with a lower "
                                          r"train\.lr; a resume would repeat"):
        _check_finished(run_dir, tmp_path / "flower", "medfed server --resume --run-dir run")


def test_the_superlink_watch_withdraws_strangers_keys_and_says_who_left_or_joined(tmp_path):
    # One thread lists the SuperLink's nodes: it withdraws a key that is not the site's,
    # keeps registered_sites.json, and says who went offline or joined once the run is on.
    import io
    from types import SimpleNamespace

    from medfed.deploy.superlink import _SuperLinkWatch

    def node(node_id, name, key, status="online"):
        return SimpleNamespace(node_id=node_id, name=name, public_key=key, status=status)

    class Control:
        def __init__(self):
            self.listed = [node(1, "alpha", b"ka"), node(2, "beta", b"kb"), node(3, "beta", b"evil")]
            self.withdrawn = []

        def stop_unfinished_runs(self, keep):
            return []

        def nodes(self):
            return [n for n in self.listed if n.node_id not in self.withdrawn]

        def unregister(self, node_id):
            self.withdrawn.append(node_id)

        def online(self):
            return {n.node_id: n.name for n in self.nodes() if n.status == "online"}

    out, control = io.StringIO(), Control()
    registered = tmp_path / "registered_sites.json"
    watch = _SuperLinkWatch(control, out, {"alpha": b"ka", "beta": b"kb"}, registered)
    watch.check()
    assert control.withdrawn == [3]
    assert json.loads(registered.read_text()) == {"1": "alpha", "2": "beta"}
    assert out.getvalue().splitlines() == [
        "medfed server: withdrew a key registered as beta that is not in trusted_sites.txt (someone reached the "
        "server's port: see 'Network' in the README)"]
    # A stranger's key registered just before the run starts is withdrawn, never counted
    # as a site that was online (and later "went offline").
    control.listed.append(node(4, "gamma", b"evil2"))
    watch.announce_sites()
    control.listed[1].status = "offline"
    watch.check()
    control.listed[1].status = "online"
    watch.check()
    assert control.withdrawn == [3, 4]
    assert [line for line in out.getvalue().splitlines()[1:] if "withdrew" not in line] == [
        "medfed server: site beta went offline", "medfed server: site beta joined"]
    # --insecure: no keys to check and no registrations to keep.
    out, control = io.StringIO(), Control()
    _SuperLinkWatch(control, out, None, registered).check()
    assert control.withdrawn == [] and not registered.exists() and out.getvalue() == ""


def test_a_round_that_kept_the_global_model_says_so_in_the_servers_progress():
    from medfed.deploy.superlink import _progress_line

    line = _progress_line({"event": "round", "round": 2, "wall_time_s": 1.0, "train": {"loss": 0.5},
                           "model_kept": "the aggregate of the valid replies is not finite (NaN/inf)"}, 3)
    assert line == ("medfed server: round 2/3 done in 1.0 s, train loss 0.5000, global model kept: the aggregate of "
                    "the valid replies is not finite (NaN/inf)")


def test_the_supernodes_colour_codes_are_left_out_of_a_log_file_and_its_lines_are_kept():
    # A site's output went to a file with 109 colour codes in it.
    import io
    import sys

    from medfed.deploy.supernode import _run_supernode

    out = io.StringIO()
    script = "print('\\x1b[32mINFO\\x1b[0m :      Starting Flower SuperNode'); print('plain line')"
    code, refused, connected, failing = _run_supernode([sys.executable, "-c", script], {}, "hospital-a", out)
    assert code == 0 and not refused and not connected and failing is None
    assert out.getvalue() == "INFO :      Starting Flower SuperNode\nplain line\n"
