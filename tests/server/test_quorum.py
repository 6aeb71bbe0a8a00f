"""The quorum guard: a round below federation.min_sites never replaces the global model."""

import json
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from medfed.server.quorum import QuorumGuard, QuorumNotMet, apply_quorum, wait_for_nodes
from medfed.strategies import FedAvg


def _reply(node_id: int, w: list[float], error: bool = False) -> Message:
    metadata = Metadata(run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id=f"i{node_id}", group_id="1", created_at=0.0, ttl=60.0,
                        message_type=MessageType.TRAIN)
    if error:
        return Message(error=Error(code=5, reason="node unavailable"), metadata=metadata)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(w))}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, metadata=metadata)


class _Grid:
    def __init__(self, counts):
        self.counts = list(counts)

    def get_node_ids(self):
        count = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        return list(range(count))


def test_apply_quorum_lowers_only_the_minimums_above_it():
    # Prepare
    strategy = FedAvg(min_available_nodes=5, min_train_nodes=5, min_evaluate_nodes=1)
    # Execute
    apply_quorum(strategy, 3)
    # Assert
    assert (strategy.min_available_nodes, strategy.min_train_nodes, strategy.min_evaluate_nodes) == (3, 3, 1)


def test_enough_valid_replies_are_averaged_and_rejections_reported():
    # Prepare: 3 replies, one NaN; quorum 2.
    rejected = []
    guard = QuorumGuard(FedAvg(), min_sites=2, num_sites=3, timeout_s=1,
                        on_rejected=lambda node, why: rejected.append((node, why)))
    replies = [_reply(1, [0.0]), _reply(2, [2.0]), _reply(3, [np.nan])]
    # Execute
    arrays, _ = guard.aggregate_train(1, replies)
    # Assert: (0 + 2) / 2 = 1; node 3 reported with the strategy's reason.
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0])
    assert rejected == [(3, "array 'w' holds 1 NaN/inf value")]


@pytest.mark.parametrize("replies, stage", [
    ([_reply(1, [0.0]), _reply(2, [1.0], error=True), _reply(3, [1.0], error=True)], "replied"),
    ([_reply(1, [0.0]), _reply(2, [np.inf]), _reply(3, [np.nan])], "valid replies"),
])
def test_below_the_quorum_the_round_is_refused(replies, stage):
    # Prepare
    guard = QuorumGuard(FedAvg(), min_sites=2, num_sites=3, timeout_s=1)
    # Execute / Assert
    with pytest.raises(QuorumNotMet) as info:
        guard.aggregate_train(4, replies)
    assert (info.value.server_round, info.value.sites, info.value.needed, info.value.stage) == (4, 1, 2, stage)


def test_waits_are_bounded_and_report_what_they_found():
    # Prepare: 1 node forever.
    grid = _Grid([1])
    # Execute
    start = time.monotonic()
    connected = wait_for_nodes(grid, 3, timeout_s=0.3, poll_s=0.05)
    # Assert: it waited out the deadline, then said what it found.
    assert connected == 1
    assert time.monotonic() - start >= 0.3


def test_a_wait_ends_when_enough_nodes_have_connected():
    grid = _Grid([1, 1, 3, 3])
    assert wait_for_nodes(grid, 3, timeout_s=30, poll_s=0.01) == 3
    assert grid.counts == [3]  # it polled until the third answer, and no further


def test_the_first_round_waits_for_every_site_and_later_rounds_for_the_quorum():
    # Prepare: a strategy that notes how many sites it finds connected when asked to sample.
    class Sampler(FedAvg):
        seen: list[int] = []

        def configure_train(self, server_round, arrays, config, grid):
            self.seen.append(len(grid.get_node_ids()))
            return []

    guard = QuorumGuard(Sampler(), min_sites=2, num_sites=3, timeout_s=30)
    # Execute: 2 of 3 sites connected, the third two polls later (1 s), in both rounds.
    list(guard.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid([2, 2, 3])))
    list(guard.configure_train(2, ArrayRecord(), ConfigRecord(), _Grid([2, 2, 3])))
    # Assert: round 1 waited for the third site; round 2 went on with the quorum of 2.
    assert Sampler.seen == [3, 2]


def test_a_round_is_not_started_without_a_quorum_connected():
    # Prepare
    guard = QuorumGuard(FedAvg(), min_sites=2, num_sites=3, timeout_s=0.2)
    # Execute / Assert
    with pytest.raises(QuorumNotMet, match="1 site\\(s\\) connected, quorum is 2"):
        guard.configure_train(1, ArrayRecord(), None, _Grid([1]))


def test_a_locked_superlink_is_asked_again_not_fatal():
    # Prepare: the first pull answers 500 (SQLite "database is locked"), the second the reply.
    import httpx

    from medfed.server.recording import RecordingGrid, RoundRecorder

    reply = _reply(7, [1.0])
    request = httpx.Request("POST", "https://superlink/v1/runtime/pull-messages")

    class Grid:
        pulls = 0

        def get_nodes(self):
            return []

        def push_messages(self, messages):
            return ["i7"]

        def pull_messages(self, ids):
            Grid.pulls += 1
            if Grid.pulls == 1:
                raise httpx.HTTPStatusError("500", request=request, response=httpx.Response(500, request=request))
            return [reply]

    class Log:
        lines = []

        def write(self, record):
            Log.lines.append(record)

    grid = RecordingGrid(Grid(), RoundRecorder(Log()), poll_interval_s=0.01)
    message = Message(content=RecordDict(), metadata=Metadata(
        run_id=1, message_id="i7", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN))
    # Execute
    replies = grid.send_and_receive([message], timeout=5)
    # Assert
    assert replies == [reply] and Grid.pulls == 2
    assert [line["event"] for line in Log.lines] == ["site"]


def test_an_error_reply_made_by_the_superlink_is_charged_to_the_unreachable_site():
    # Prepare: the SuperLink (node 1) answers for node 7, which stopped sending heartbeats.
    from medfed.server.recording import RoundRecorder

    lines = []
    recorder = RoundRecorder(type("Log", (), {"write": staticmethod(lines.append)})())
    recorder.node_names[7] = "beta"
    error = Message(error=Error(code=5, reason="Node Unavailable"), metadata=Metadata(
        run_id=1, message_id="e", src_node_id=1, dst_node_id=0, reply_to_message_id="i7", group_id="1",
        created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN))
    # Execute
    recorder.record_exchange("train", {7: 10}, [error], {"i7": 7})
    # Assert
    assert lines == [{"event": "dropout", "round": 0, "phase": "train", "site": "beta",
                      "reason": "error reply: Node Unavailable"}]


def test_a_sites_exception_is_recorded_as_people_read_it():
    # Flower writes a ClientApp's exception as <class 'module.Name'>:<'text'>.
    from medfed.server.recording import error_text

    reason = "<class 'medfed.client.client_app.SiteFailure'>:<'SiteDataError at the site; the site\\'s log has it'>"
    assert error_text(reason) == "SiteFailure: SiteDataError at the site; the site\\'s log has it"
    assert error_text("Node Unavailable") == "Node Unavailable"


def test_an_aggregate_that_overflows_keeps_the_global_model_and_the_run_goes_on():
    # Prepare: three valid replies (quorum 2 met) whose aggregate overflows (as FedLD's
    # float32 Gram matrix and FedTrimmedAvg's sum did near float32's limit).
    strategy = FedAvg()
    strategy.aggregate_valid_replies = lambda server_round, kept: (ArrayRecord({"w": Array(np.array([np.inf]))}), None)
    guard = QuorumGuard(strategy, min_sites=2, num_sites=3, timeout_s=1)
    # Execute
    arrays, _ = guard.aggregate_train(2, [_reply(node, [1.0]) for node in (1, 2, 3)])
    # Assert: no new arrays (Flower keeps the previous ones), and no "0 valid replies" quorum error.
    assert arrays is None
    assert strategy.model_kept == "the aggregate of the valid replies is not finite (NaN/inf)"


@pytest.mark.parametrize("misses, stops", [([3, 5, 8], False), ([3, 3, 3], True)])
def test_quorum_retries_count_per_round_not_over_the_whole_run(misses, stops, monkeypatch, tmp_path):
    # round_retries=2 is "in a row": three misses of different rounds stopped a long study.
    from types import SimpleNamespace

    from medfed.config import ExperimentConfig
    from medfed.server import server_app
    from medfed.server.quorum import QuorumError, QuorumNotMet

    cfg = ExperimentConfig()
    fails = iter(misses)

    def run(grid, cfg, run_dir, resume):
        missed = next(fails, None)
        if missed is not None:
            raise QuorumNotMet(missed, 1, 2, "valid replies")

    monkeypatch.setattr(server_app, "_run", run)
    monkeypatch.setattr(server_app, "check_run_config", lambda run_config: None)
    monkeypatch.setattr(server_app, "read_run_config", lambda run_config: (cfg, tmp_path, False))
    if stops:
        with pytest.raises(QuorumError, match=r"^Round 3 had 1 site\(s\) valid replies .* 3 time\(s\) in a row"):
            server_app.main(None, SimpleNamespace(run_config={}))
    else:
        server_app.main(None, SimpleNamespace(run_config={}))
    attempts = [json.loads(line)["attempt"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert attempts == ([1, 2, 3] if stops else [1, 1, 1])


class _MessagingGrid(_Grid):
    """A grid whose node count changes between calls, and that can build messages."""

    def __init__(self, counts):
        from medfed.simulation.local import _ensure_task_identity

        super().__init__(counts)
        _ensure_task_identity()  # Flower 1.42 stamps new Messages with the task identity

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)


def _within(seconds, call):
    """``call()``'s result, or a failure if it has not returned after ``seconds`` (a thread)."""
    import threading

    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return result[0]


def test_evaluation_without_a_quorum_connected_is_skipped_not_waited_for_forever():
    # Flower's sampling loops, without a deadline, until min_available_nodes are connected:
    # sites that left after training hung the server before the round's checkpoint.
    from medfed.server.recording import RoundRecorder

    lines = []
    recorder = RoundRecorder(type("Log", (), {"write": staticmethod(lines.append)})())
    recorder.round_started(1)
    guard = QuorumGuard(FedAvg(min_available_nodes=2, min_evaluate_nodes=2), min_sites=2, num_sites=3,
                        timeout_s=0.3, on_evaluation_skipped=recorder.evaluation_skipped)
    messages = _within(10, lambda: list(guard.configure_evaluate(1, ArrayRecord(), ConfigRecord(),
                                                                 _MessagingGrid([1]))))
    assert messages == []
    # The round line says so (and with it medfed server's progress and the report).
    assert recorder.round_finished(3)["evaluation_skipped"] == (
        "1 site(s) connected for evaluation within 0.3 s, fewer than the quorum (2)")
    # With the quorum connected, every connected site evaluates.
    messages = _within(10, lambda: list(guard.configure_evaluate(1, ArrayRecord(), ConfigRecord(),
                                                                 _MessagingGrid([3]))))
    assert sorted(m.metadata.dst_node_id for m in messages) == [0, 1, 2]


@pytest.mark.parametrize("phase", ["train", "evaluate"])
def test_a_site_leaving_after_the_wait_cannot_make_flowers_sampling_wait_forever(phase):
    # 3 sites when the guard counted them, 1 when Flower's sampling looks: it is given the count.
    guard = QuorumGuard(FedAvg(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2), min_sites=2,
                        num_sites=3, timeout_s=0.3, wait_for_all_first=False)
    configure = guard.configure_train if phase == "train" else guard.configure_evaluate
    messages = _within(10, lambda: list(configure(2, ArrayRecord(), ConfigRecord(), _MessagingGrid([3, 3, 1]))))
    assert sorted(m.metadata.dst_node_id for m in messages) == [0, 1, 2]


def test_an_evaluation_reply_the_strategy_refuses_is_a_dropout_not_a_site_result():
    # A reply with no examples was refused by the aggregate but recorded as an ordinary site line.
    from flwr.app import ConfigRecord as Config

    from medfed.server.recording import RoundRecorder

    def reply(node_id, name, examples, acc):
        metadata = Metadata(run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
                            reply_to_message_id=f"i{node_id}", group_id="1", created_at=0.0, ttl=60.0,
                            message_type=MessageType.EVALUATE)
        content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "acc": acc}),
                              "site": Config({"name": name})})
        return Message(content=content, metadata=metadata)

    lines = []
    recorder = RoundRecorder(type("Log", (), {"write": staticmethod(lines.append)})())
    recorder.round_started(1)
    recorder.record_exchange("evaluate", {}, [reply(1, "a", 10, 0.9), reply(2, "b", 0, 0.1)])
    assert [(line["event"], line["site"]) for line in lines] == [("site", "a"), ("dropout", "b")]
    assert lines[1]["phase"] == "evaluate" and lines[1]["reason"].startswith("reply rejected: ")


def test_a_stop_after_a_diverged_global_model_blames_the_aggregate_not_the_sites():
    # Every site diverged in round 3 because round 2's aggregate was already inf: "lower
    # train.lr" alone missed the server's part.
    from medfed.server.quorum import quorum_advice

    diverged = {"event": "dropout", "round": 3, "phase": "train", "site": "a",
                "reason": "error reply: SiteFailure: TrainingDivergedError at the site"}
    # Each retry of round 3 (round_retries, default 2) starts anew, after round 2's line.
    records = [{"event": "start"}, {"event": "round", "round": 2, "evaluate": {"loss": None, "acc": 0.5}}, diverged,
               {"event": "start"}, diverged, {"event": "start"}, diverged]
    assert "starting from a global model whose test loss in round 2 was not finite" in quorum_advice(records, 3, "x")
    records[1]["evaluate"]["loss"] = 0.7
    assert quorum_advice(records, 3, "x").startswith("Every site's training diverged (a NaN or infinite loss")


def test_text_a_site_sends_is_printed_without_control_characters():
    # A site's name, error or problem reaches the coordinator's terminal and log: escape
    # codes in it could rewrite what the coordinator sees.
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from medfed.server.held_out import _role
    from medfed.server.recording import error_text, site_name, site_text

    assert site_text("alpha\x1b[2J\r\nbeta") == "alpha?[2J??beta"
    assert len(site_text("x" * 10_000)) == 300
    assert error_text("refused\x1b]0;owned\x07") == "refused?]0;owned?"
    content = RecordDict({"site": ConfigRecord({"name": "a\x1b[31mb", "problem": "bad\x1b[0m"})})
    reply = SimpleNamespace(content=content, has_error=lambda: False, metadata=SimpleNamespace(src_node_id=3))
    assert site_name(reply) == "a?[31mb"
    role = _role(reply)
    assert (role.name, role.problem) == ("a?[31mb", "bad?[0m")
