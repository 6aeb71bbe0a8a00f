"""A deployed site whose data does not fit the study is named and left out, not failed every round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict
from PIL import Image

from medfed.client.client_app import app as client_app
from medfed.config import to_run_config
from medfed.server import server_app
from medfed.server.held_out import SiteRoster
from medfed.server.quorum import QuorumError
from medfed.simulation.local import LocalGrid


def _site_folder(root: Path, size: int) -> Path:
    """A site folder of 8 train + 4 test grayscale PNGs of ``size`` px, 2 classes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["filename,label,split"]
    for i, split in enumerate(["train"] * 8 + ["test"] * 4):
        Image.fromarray(rng.integers(0, 256, size=(size, size), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{i % 2},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _grid(cfg, tiny_root: Path, bad: Path) -> LocalGrid:
    nodes = [{"data-path": str(tiny_root), "site-name": name} for name in ("alpha", "beta")]
    nodes.append({"data-path": str(bad), "site-name": "gamma"})
    return LocalGrid(client_app, nodes, to_run_config(cfg))


def test_the_roster_leaves_out_a_site_unlike_the_study_and_takes_it_back_once_fixed(tiny_root, tiny_config, tmp_path):
    # Prepare: gamma's images are 64 px in a 28 px study; medfed client's own check passes them.
    cfg = tiny_config(tiny_root, tmp_path)
    bad = _site_folder(tmp_path / "gamma" / "ward-7", 64)
    grid = _grid(cfg, tiny_root, bad)
    gamma = max(grid.get_node_ids())
    answers = []
    roster = SiteRoster(grid, check_data=True, on_answer=lambda node, role: answers.append((role.name, role.problem)))
    # Execute
    roster.discover(0, 60.0)
    # Assert: named, with what differs and nothing of where the site keeps its images.
    assert list(roster.left_out) == [gamma]
    problem = ("the site's data does not fit the study: the site holds 64x64 px images (width x height) but the "
               "study's data.img_size is 28")
    assert sorted(answers) == [("alpha", ""), ("beta", ""), ("gamma", problem)]
    # Execute: before the next rounds gamma is asked again, its answer read a round later.
    roster.refresh()
    roster.refresh()
    assert list(roster.left_out) == [gamma] and answers[-1] == ("gamma", problem)
    _site_folder(bad, 28)  # the site fixes its images
    roster.refresh()  # reads the answer given before the fix, asks again
    assert list(roster.left_out) == [gamma]
    roster.refresh()
    # Assert
    assert roster.left_out == {} and answers[-1] == ("gamma", "")


def test_a_refused_instruction_says_what_does_not_fit_without_the_sites_paths(tiny_root, tiny_config, tmp_path):
    # A site that joined after the check, or a server that never asked: the refusal itself says why.
    from flwr.app import ConfigRecord, Message

    cfg = tiny_config(tiny_root, tmp_path)
    grid = _grid(cfg, tiny_root, _site_folder(tmp_path / "gamma" / "ward-7", 64))
    message = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 4, MessageType.EVALUATE)
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error()
    assert "does not fit the study: the site holds 64x64 px images" in reply.error.reason
    assert "ward-7" not in reply.error.reason


def _serve(cfg, grid: LocalGrid, run_dir: Path, monkeypatch, resume: bool = False) -> None:
    monkeypatch.setattr(server_app, "_is_deployed", lambda grid: True)  # as under a SuperLink
    run_config = {**to_run_config(cfg), server_app.RUN_DIR_KEY: str(run_dir), server_app.RESUME_KEY: resume}
    server_app.app(grid=grid, context=Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                              run_config=run_config))


def test_a_deployed_run_goes_on_without_the_site_and_says_why_once(tiny_root, tiny_config, tmp_path, monkeypatch):
    # Prepare
    cfg = tiny_config(tiny_root, tmp_path, rounds=2, federation={"num_sites": 3, "min_sites": 2})
    grid = _grid(cfg, tiny_root, _site_folder(tmp_path / "gamma" / "ward-7", 64))
    run_dir = tmp_path / "run"
    # Execute
    _serve(cfg, grid, run_dir, monkeypatch)
    # Assert: one record says why gamma is out; it never trained, was never evaluated, never "dropped out".
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    left_out = [r for r in records if r["event"] == "site_left_out"]
    assert [(r["site"], r["round"]) for r in left_out] == [("gamma", 1)]
    assert "64x64 px images" in left_out[0]["reason"]
    sites = {(r["round"], r["phase"], r["site"]) for r in records if r["event"] == "site"}
    assert sites == {(n, phase, site) for n in (1, 2) for phase in ("train", "evaluate") for site in ("alpha", "beta")}
    assert not [r for r in records if r["event"] == "dropout"]
    assert records[-1]["event"] == "end"
    assert "64x64 px images" in (run_dir / "report.html").read_text()


def test_too_few_fitting_sites_stop_the_run_before_round_1(tiny_root, tiny_config, tmp_path, monkeypatch):
    # Prepare: the quorum needs all three sites.
    cfg = tiny_config(tiny_root, tmp_path, federation={"num_sites": 3, "min_sites": 3})
    grid = _grid(cfg, tiny_root, _site_folder(tmp_path / "gamma", 64))
    # Execute
    with pytest.raises(QuorumError, match=r"Only 2 site\(s\) have data that fits the study, fewer than the quorum "
                                          r"\(federation.min_sites\) of 3; left out: gamma"):
        _serve(cfg, grid, tmp_path / "run", monkeypatch)
    # Assert: no round was started; why it stopped is on record for medfed server to say.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "site_left_out", "stopped"]
    assert records[-1]["reason"].startswith("only 2 site(s) have data that fits the study")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_says_a_site_is_back_once_fixed_and_not_twice_that_it_is_out(
    tiny_root, tiny_config, tmp_path, monkeypatch
):
    # By site name, not node: a site restarted, or a resumed run, brings it back as another node.
    cfg = tiny_config(tiny_root, tmp_path, rounds=1, federation={"num_sites": 3, "min_sites": 2})
    bad = _site_folder(tmp_path / "gamma", 64)
    run_dir = tmp_path / "run"
    _serve(cfg, _grid(cfg, tiny_root, bad), run_dir, monkeypatch)
    # Execute: resumed with one more round, gamma unchanged: nothing new to say.
    more = tiny_config(tiny_root, tmp_path, rounds=2, federation={"num_sites": 3, "min_sites": 2})
    _serve(more, _grid(more, tiny_root, bad), run_dir, monkeypatch, resume=True)
    assert [r["site"] for r in _records(run_dir) if r["event"] == "site_left_out"] == ["gamma"]
    # Execute: gamma fixes its images; one more round.
    _site_folder(bad, 28)
    last = tiny_config(tiny_root, tmp_path, rounds=3, federation={"num_sites": 3, "min_sites": 2})
    _serve(last, _grid(last, tiny_root, bad), run_dir, monkeypatch, resume=True)
    # Assert: back in round 3, and trained there.
    records = _records(run_dir)
    assert [(r["round"], r["site"]) for r in records if r["event"] == "site_admitted"] == [(3, "gamma")]
    assert {r["site"] for r in records if r["event"] == "site" and r["round"] == 3} == {"alpha", "beta", "gamma"}
    assert "its data fits the study now" in (run_dir / "report.html").read_text()


def test_a_simulation_asks_no_site_about_its_data(tiny_root, tiny_config, tmp_path, monkeypatch):
    # Simulated sites are built from the study: the check is for deployment only.
    from medfed.simulation.local import run_local

    asked = []

    class Spy(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            asked.extend(m.content["config"]["question"] for m in messages if m.metadata.message_type == MessageType.QUERY)
            return super().push_messages(messages)

    import medfed.simulation.local as local

    monkeypatch.setattr(local, "LocalGrid", Spy)
    run_local(tiny_config(tiny_root, tmp_path, rounds=1, federation={"num_sites": 3, "fraction_train": 0.67}))
    assert asked and set(asked) == {"site-role"}  # asked who they are (a round samples), never about data


def test_a_second_site_answering_with_a_name_already_taken_is_left_out(tiny_root, tiny_config, tmp_path):
    # Prepare: two sites claim "alpha" (a copied site folder, or a site posing as another);
    # both rows would be recorded as alpha's, the later overwriting the earlier.
    cfg = tiny_config(tiny_root, tmp_path)
    nodes = [{"data-path": str(tiny_root), "site-name": name} for name in ("alpha", "beta", "alpha")]
    grid = LocalGrid(client_app, nodes, to_run_config(cfg))
    first, _, second = sorted(grid.get_node_ids())
    roster = SiteRoster(grid, check_data=True)
    # Execute
    roster.discover(0, 60.0)
    # Assert
    assert list(roster.left_out) == [second] and first not in roster.left_out
    assert roster.left_out[second].problem == ("another connected site already answers as 'alpha'; each site needs "
                                               "its own name and key")


def test_a_site_answering_under_another_sites_registered_name_is_left_out(tiny_root, tiny_config, tmp_path):
    # Prepare: beta's key is registered as "beta", but its node says it is "alpha" (a site
    # posing as another, ahead of it): the SuperLink's registration decides.
    cfg = tiny_config(tiny_root, tmp_path)
    nodes = [{"data-path": str(tiny_root), "site-name": name} for name in ("alpha", "alpha")]
    grid = LocalGrid(client_app, nodes, to_run_config(cfg))
    first, second = sorted(grid.get_node_ids())
    registered = {first: "beta", second: "alpha"}
    roster = SiteRoster(grid, check_data=True, registered=lambda: registered)
    # Execute
    roster.discover(0, 60.0)
    # Assert: the impostor is left out, the real alpha keeps its name.
    assert list(roster.left_out) == [first]
    assert roster.left_out[first].problem == "it answers as 'alpha' but its key is registered as 'beta'"
    assert roster.names[second] == "alpha"


def test_registered_site_names_are_read_from_the_run_folder(tmp_path):
    from medfed.server.run_files import REGISTERED_SITES_FILE, read_registered_sites

    assert read_registered_sites(tmp_path) is None  # simulation, --insecure
    (tmp_path / REGISTERED_SITES_FILE).parent.mkdir(parents=True)
    (tmp_path / REGISTERED_SITES_FILE).write_text(json.dumps({"123": "alpha", "18446744073709551615": "beta"}))
    assert read_registered_sites(tmp_path) == {123: "alpha", 18446744073709551615: "beta"}


def test_a_node_whose_key_is_not_among_the_registered_sites_is_left_out(tiny_root, tiny_config, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path)
    grid = LocalGrid(client_app, [{"data-path": str(tiny_root), "site-name": "alpha"}], to_run_config(cfg))
    (node,) = grid.get_node_ids()
    roster = SiteRoster(grid, check_data=True, registered=lambda: {})
    roster.discover(0, 60.0)
    assert roster.left_out[node].problem == "its key is not one of the study's registered sites"


def _plugin_module(folder: Path, monkeypatch) -> Path:
    """A plug-in strategy module on sys.path that leaves a file behind when it is imported."""
    mark = folder / "imported"
    (folder / "medfed_probe_plugin.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).write_text('yes')\n"
        "from flwr.serverapp.strategy import FedAvg\n\n\nclass Plugin(FedAvg):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    return mark


def test_a_deployed_site_runs_a_plugin_strategy_only_when_its_operator_allows_it(tiny_root, tiny_config, tmp_path,
                                                                                 monkeypatch):
    # The coordinator's config named any importable module, and every site imported it and
    # ran its client half next to its images, which also chooses what the replies carry.
    from flwr.app import ConfigRecord, Message

    mark = _plugin_module(tmp_path, monkeypatch)
    cfg = tiny_config(tiny_root, tmp_path, strategy={"name": "medfed_probe_plugin:Plugin"})
    nodes = [{"data-path": str(tiny_root), "site-name": "alpha"},
             {"data-path": str(tiny_root), "site-name": "beta", "allowed-strategies": "other:X medfed_probe_plugin:Plugin"}]
    grid = LocalGrid(client_app, nodes, to_run_config(cfg))
    alpha, beta = sorted(grid.get_node_ids())
    refusal = ("the study uses the plug-in strategy 'medfed_probe_plugin:Plugin', whose code this site does not run "
               "unless its operator allows it ('medfed client --allow-strategy medfed_probe_plugin:Plugin')")
    # Execute / Assert: alpha refuses an instruction, before importing anything.
    message = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), alpha, MessageType.EVALUATE)
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and refusal in reply.error.reason
    assert not mark.exists()
    # ... and the server's check leaves it out at the start, with that reason; beta allowed it.
    roster = SiteRoster(grid, check_data=True)
    roster.discover(0, 60.0)
    assert {node: role.problem for node, role in roster.left_out.items()} == {alpha: refusal}
    assert mark.exists()  # beta imported it


def test_simulated_sites_and_registered_strategies_need_no_permission(tiny_root, tiny_config, tmp_path):
    from medfed.client.site_data import policy_refusal

    plugin = tiny_config(tiny_root, tmp_path, strategy={"name": "medfed_probe_plugin:Plugin"})
    assert policy_refusal({"partition-id": 0, "num-partitions": 3}, plugin) is None
    assert policy_refusal({"data-path": str(tiny_root)}, tiny_config(tiny_root, tmp_path)) is None  # FedAvg
    assert policy_refusal({"data-path": str(tiny_root), "allowed-strategies": "medfed_probe_plugin:Plugin2"},
                          plugin) is not None  # another plug-in's name is no permission


def test_a_site_that_keeps_its_test_scores_is_left_out_of_a_study_that_pools_them(tiny_root, tiny_config, tmp_path):
    # The coordinator alone decided whether a site's score histograms leave it.
    nodes = [{"data-path": str(tiny_root), "site-name": "alpha"},
             {"data-path": str(tiny_root), "site-name": "beta", "pooled-test-metrics": "false"}]
    for pooled, left_out in ((True, ["beta"]), (False, [])):
        cfg = tiny_config(tiny_root, tmp_path, federation={"num_sites": 2, "pooled_test_metrics": pooled})
        roster = SiteRoster(LocalGrid(client_app, nodes, to_run_config(cfg)), check_data=True)
        roster.discover(0, 60.0)
        assert [role.name for role in roster.left_out.values()] == left_out
        if left_out:
            (role,) = roster.left_out.values()
            assert "which this site's operator does not send; set federation.pooled_test_metrics: false" in role.problem


class _Clock:
    """Stands in for the ``time`` module: sleeping moves the clock on at once."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _LateGrid(LocalGrid):
    """A LocalGrid whose sites named in ``late`` answer the server's question only at that
    clock time (as a SuperNode cut off mid-message answers after it reconnects)."""

    def __init__(self, *args, late: dict[str, float], clock: _Clock) -> None:
        super().__init__(*args)
        self.late, self.clock, self.due = late, clock, {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message_id, message in zip(ids, messages):
            name = self.contexts[message.metadata.dst_node_id].node_config["site-name"]
            if message.metadata.message_type == MessageType.QUERY and name in self.late:
                self.due[message_id] = self.clock.start + self.late[name]
        return ids

    def pull_messages(self, message_ids):
        return super().pull_messages([i for i in message_ids if self.clock.now >= self.due.get(i, 0.0)])

    def send_and_receive(self, messages, *, timeout=None):  # as Flower's: pull every 3 s until the timeout
        pending, replies = set(self.push_messages(messages)), []
        end = self.clock.now + timeout
        while self.clock.now < end:
            pulled = list(self.pull_messages(pending))
            replies += pulled
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not pending:
                break
            self.clock.sleep(3)
        return replies


def _late_grid(cfg, tiny_root: Path, clock: _Clock, monkeypatch, **late: float) -> _LateGrid:
    from medfed.server import held_out

    monkeypatch.setattr(held_out, "time", clock)
    clock.start = clock.now
    nodes = [{"data-path": str(tiny_root), "site-name": name} for name in ("alpha", "beta", "gamma")]
    return _LateGrid(client_app, nodes, to_run_config(cfg), late=late, clock=clock)


def test_while_a_site_is_late_the_server_says_every_30_s_whom_it_waits_for(tiny_root, tiny_config, tmp_path,
                                                                          monkeypatch):
    from medfed.server import held_out

    # Prepare: beta and gamma (their keys registered under their names) answer after 75 s.
    cfg = tiny_config(tiny_root, tmp_path)
    clock = _Clock()
    grid = _late_grid(cfg, tiny_root, clock, monkeypatch, beta=75.0, gamma=75.0)
    alpha, beta, gamma = sorted(grid.get_node_ids())
    registered = {alpha: "alpha", beta: "beta", gamma: "gamma"}
    lines, waits = [], []
    monkeypatch.setattr(held_out, "log", lambda level, text, *args: lines.append(text % args))
    roster = SiteRoster(grid, check_data=True, timeout_s=600.0, registered=lambda: registered,
                        on_wait=waits.append)
    # Execute
    roster.discover(0, 600.0)
    # Assert: the answers are those of sites that answer at once.
    assert roster.names == {alpha: "alpha", beta: "beta", gamma: "gamma"} and roster.left_out == {}
    assert [(w.answered, w.asked, w.missing, w.remaining_s) for w in waits] == [
        (1, 3, ("beta", "gamma"), 570.0), (1, 3, ("beta", "gamma"), 540.0)]
    assert lines == [
        "1 of 3 site(s) have answered the check of their data; waiting for beta, gamma (at most 570 s more, then "
        "the run goes on without their answer)",
        "1 of 3 site(s) have answered the check of their data; waiting for beta, gamma (at most 540 s more, then "
        "the run goes on without their answer)",
    ]


def test_a_site_that_answers_after_the_wait_is_not_heard_as_before(tiny_root, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_root, tmp_path)
    clock = _Clock()
    grid = _late_grid(cfg, tiny_root, clock, monkeypatch, gamma=100.0)
    alpha, beta, gamma = sorted(grid.get_node_ids())
    waits = []
    roster = SiteRoster(grid, check_data=True, timeout_s=45.0, on_wait=waits.append)
    roster.discover(0, 45.0)
    # Asked no more, sampled like any site; the wait ended at the timeout. No name is known
    # for a node that never answered (--insecure): its id stands for it.
    assert roster.names == {alpha: "alpha", beta: "beta"} and roster._silent == {gamma}
    assert 1045.0 <= clock.now < 1049.0
    assert [w.missing for w in waits] == [(f"node {gamma}",)]


def test_medfed_server_prints_whom_a_deployed_run_waits_for(tiny_root, tiny_config, tmp_path, monkeypatch):
    from medfed.deploy.superlink import _progress_line

    from medfed.server.run_files import REGISTERED_SITES_FILE

    # Prepare: gamma answers the check before round 1 after 40 s; the sites' keys are
    # registered under their names (medfed server with TLS).
    cfg = tiny_config(tiny_root, tmp_path, rounds=1)
    grid = _late_grid(cfg, tiny_root, _Clock(), monkeypatch, gamma=40.0)
    run_dir = tmp_path / "run"
    (run_dir / REGISTERED_SITES_FILE).parent.mkdir(parents=True)
    (run_dir / REGISTERED_SITES_FILE).write_text(json.dumps({"2": "alpha", "3": "beta", "4": "gamma"}))
    # Execute
    _serve(cfg, grid, run_dir, monkeypatch)
    # Assert: one line on medfed server's terminal; the run went on with all three.
    records = _records(run_dir)
    waiting = [r for r in records if r["event"] == "waiting_for_sites"]
    assert [(r["round"], r["answered"], r["asked"], r["missing"], r["remaining_s"]) for r in waiting] == [
        (1, 2, 3, ["gamma"], 570)]
    assert _progress_line(waiting[0], 1) == (
        "medfed server: round 1: waiting for site(s) gamma to check their data (2 of 3 answered; at most 570 s more, "
        "then the run goes on without their answer)")
    assert {r["site"] for r in records if r["event"] == "site"} == {"alpha", "beta", "gamma"}
    assert records[-1]["event"] == "end"
