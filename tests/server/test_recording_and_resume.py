"""What the server records per round, and the pieces of resume (no model, no data)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from medfed.config import config_from_dict, config_to_dict, save_config
from medfed.server.recording import RecordingGrid, RoundRecorder
from medfed.server.metrics_log import MetricsLog
from medfed.server.checkpoint import CheckpointError, save_checkpoint
from medfed.server.resume import (
    ResumeError,
    RoundOffsetStrategy,
    check_checkpoint_fits,
    check_run_dir,
    get_rng_state,
    prepare_run_dir,
    run_key_of,
    set_rng_state,
)
from medfed.simulation.local import LocalGrid

WEIGHTS = np.arange(6, dtype=np.float32)  # 24 bytes of payload


def _echo_app() -> ClientApp:
    """Sites that reply with fixed arrays and metrics and their node config's site name."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(WEIGHTS)}),
            "metrics": MetricRecord({"num-examples": 2, "loss": 0.5}),
            "site": ConfigRecord({"name": context.node_config["site-name"], "time-s": 0.25}),
        })
        return Message(content, reply_to=msg)

    return app


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_messages(grid, node_ids) -> list[Message]:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(WEIGHTS)}), "config": ConfigRecord({"server-round": 1})})
    return [Message(content, node_id, MessageType.TRAIN) for node_id in node_ids]


def test_recording_grid_sorts_replies_by_site_and_logs_each_site(tmp_path):
    # Prepare: node order differs from the sites' natural order.
    names = ["site-10", "site-2", "site-1"]
    inner = LocalGrid(_echo_app(), [{"site-name": n} for n in names], run_config={})
    recorder = RoundRecorder(MetricsLog(tmp_path / "metrics.jsonl"))
    recorder.round_started(3)
    grid = RecordingGrid(inner, recorder)
    # Execute
    replies = grid.send_and_receive(_train_messages(grid, grid.get_node_ids()))
    # Assert
    assert [r.content["site"]["name"] for r in replies] == ["site-1", "site-2", "site-10"]
    records = _read(tmp_path / "metrics.jsonl")
    payload = ArrayRecord({"w": Array(WEIGHTS)}).count_bytes()
    assert [r["site"] for r in records] == ["site-1", "site-2", "site-10"]
    assert records[0] == {
        "event": "site", "round": 3, "phase": "train", "site": "site-1", "num_examples": 2,
        "metrics": {"loss": 0.5}, "bytes_sent": payload, "bytes_received": payload, "time_s": 0.25,
    }


def test_round_line_sums_bytes_and_keeps_scalar_aggregates(tmp_path):
    # Prepare
    inner = LocalGrid(_echo_app(), [{"site-name": "a"}, {"site-name": "b"}], run_config={})
    recorder = RoundRecorder(MetricsLog(tmp_path / "metrics.jsonl"))
    grid = RecordingGrid(inner, recorder)
    recorder.round_started(1)
    grid.send_and_receive(_train_messages(grid, grid.get_node_ids()))
    recorder.aggregated("train", MetricRecord({"loss": 0.5}))
    recorder.aggregated("evaluate", MetricRecord({"acc": 0.75, "confusion": [1.0, 2.0], "num-classes": 2.0}))
    # Execute
    record = recorder.round_finished(num_rounds=1)
    # Assert
    payload = ArrayRecord({"w": Array(WEIGHTS)}).count_bytes()
    assert (record["bytes_sent"], record["bytes_received"]) == (2 * payload, 2 * payload)
    assert record["train"] == {"loss": 0.5} and record["evaluate"] == {"acc": 0.75}
    assert record["wall_time_s"] >= 0
    assert _read(tmp_path / "metrics.jsonl")[-1]["event"] == "round"
    assert recorder.history == [record]


class _SpyStrategy(FedAvg):
    def __init__(self) -> None:
        super().__init__()
        self.rounds: list[tuple[str, int]] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.rounds.append(("configure_train", server_round))
        return []

    def aggregate_train(self, server_round, replies):
        self.rounds.append(("aggregate_train", server_round))
        return None, MetricRecord({"loss": 1.0})

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.rounds.append(("configure_evaluate", server_round))
        return []

    def aggregate_evaluate(self, server_round, replies):
        self.rounds.append(("aggregate_evaluate", server_round))
        return None


def test_round_offset_strategy_shifts_every_round_number(tmp_path):
    # Prepare
    spy = _SpyStrategy()
    recorder = RoundRecorder(MetricsLog(tmp_path / "metrics.jsonl"))
    wrapped = RoundOffsetStrategy(spy, offset=4, recorder=recorder)
    # Execute
    wrapped.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None)
    wrapped.aggregate_train(1, [])
    wrapped.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid=None)
    wrapped.aggregate_evaluate(1, [])
    # Assert
    assert spy.rounds == [
        ("configure_train", 5), ("aggregate_train", 5), ("configure_evaluate", 5), ("aggregate_evaluate", 5),
    ]
    assert recorder.server_round == 5
    assert wrapped.fraction_train == spy.fraction_train  # other attributes are the strategy's


def test_rng_state_round_trips_through_json():
    # Prepare
    random.seed(1)
    np.random.seed(1)
    state = json.loads(json.dumps(get_rng_state()))
    expected = (random.random(), float(np.random.random()))
    random.seed(99)
    np.random.seed(99)
    # Execute
    set_rng_state(state)
    # Assert
    assert (random.random(), float(np.random.random())) == expected


@pytest.fixture()
def stored_run(tmp_path):
    cfg = config_from_dict({"rounds": 3, "output_dir": str(tmp_path)})
    run_dir = tmp_path / cfg.name
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("")
    return cfg, run_dir


def test_a_finished_run_is_resumed_only_with_more_rounds_and_never_restarted(stored_run):
    # Prepare: the run finished its 3 rounds.
    cfg, run_dir = stored_run
    (run_dir / "metrics.jsonl").write_text('{"event": "start"}\n{"event": "end", "rounds_done": 3}\n')
    more = config_from_dict({"rounds": 5, "output_dir": cfg.output_dir})
    # Execute / Assert: resuming it as it is would restart nothing and append a second start/end.
    with pytest.raises(ResumeError, match="has already finished its 3 rounds; to train on, resume with more rounds "
                                          r"\(--set rounds=4 or more\)"):
        check_run_dir(cfg, run_dir, resume=True)
    assert check_run_dir(more, run_dir, resume=True) == cfg
    with pytest.raises(ResumeError, match="already holds a finished run \\(3 rounds\\); start the new run in another"):
        check_run_dir(cfg, run_dir, resume=False)


def test_resume_accepts_the_stored_config_with_more_rounds(stored_run):
    # Prepare
    cfg, run_dir = stored_run
    # Execute
    stored = check_run_dir(config_from_dict({"rounds": 5, "output_dir": cfg.output_dir}), run_dir, resume=True)
    # Assert
    assert stored == cfg


def test_resume_may_switch_engine(stored_run):
    # Both engines give the same weights (tests/simulation/test_end_to_end.py).
    cfg, run_dir = stored_run
    other = config_from_dict({"rounds": 3, "output_dir": cfg.output_dir, "simulation": {"engine": "ray"}})
    assert check_run_dir(other, run_dir, resume=True) == cfg


def test_a_resume_that_fails_on_its_checkpoint_leaves_config_yaml_alone(stored_run):
    # Prepare: a corrupt checkpoint, and a resume that asks for more rounds.
    cfg, run_dir = stored_run
    (run_dir / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    before = (run_dir / "config.yaml").read_bytes()
    # Execute
    with pytest.raises(CheckpointError):
        prepare_run_dir(config_from_dict({"rounds": 5, "output_dir": cfg.output_dir}), run_dir, resume=True)
    # Assert
    assert (run_dir / "config.yaml").read_bytes() == before


@pytest.mark.parametrize(
    ("changes", "resume", "message"),
    [
        ({}, False, "already holds a run; continue it with --resume"),
        ({"train": {"lr": 0.5}}, True, "has train.lr=0.001 but this run asks for train.lr=0.5"),
        ({"rounds": 2}, True, "'rounds' may only grow"),
    ],
)
def test_run_dir_checks_give_one_line_errors(stored_run, changes, resume, message):
    # Prepare
    cfg, run_dir = stored_run
    other = config_from_dict({"rounds": 3, "output_dir": cfg.output_dir, **changes})
    # Execute
    with pytest.raises(ResumeError) as info:
        check_run_dir(other, run_dir, resume=resume)
    # Assert
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def _checkpoint(run_dir, cfg, arrays=None, **state) -> None:
    """A checkpoint after round 1 made with ``cfg`` (as the ServerApp records it)."""
    save_checkpoint(run_dir / "checkpoint.safetensors", server_round=1, arrays=arrays or {"w": WEIGHTS},
                    strategy_state={}, state={"config": config_to_dict(cfg), "run_key": "0123456789abcdef", **state})


@pytest.mark.parametrize(("edit", "message"), [
    ({"train": {"lr": 0.01}}, "was made with train.lr=0.001 but this run asks for train.lr=0.01"),
    ({"train": {"local_epochs": 3}}, "was made with train.local_epochs=2 but this run asks for train.local_epochs=3"),
    ({"rounds": 2}, "was made with rounds=3; 'rounds' may only grow"),
])
def test_a_config_yaml_edited_after_the_checkpoint_is_refused(stored_run, edit, message):
    # Prepare: config.yaml edited by hand after round 1 (the same change by --set was refused).
    cfg, run_dir = stored_run
    _checkpoint(run_dir, cfg)
    edited = config_from_dict({"rounds": 3, "output_dir": cfg.output_dir, **edit})
    save_config(edited, run_dir / "config.yaml")
    before = (run_dir / "config.yaml").read_bytes()
    # Execute
    with pytest.raises(ResumeError) as info:
        prepare_run_dir(edited, run_dir, resume=True)
    # Assert
    assert message in str(info.value) and "checkpoint.safetensors" in str(info.value)
    assert "\n" not in str(info.value)
    assert (run_dir / "config.yaml").read_bytes() == before


def test_a_resume_may_change_what_its_checkpoint_allows(stored_run):
    # rounds may grow, the engine and the round timeout may change; an older checkpoint
    # without a key of today's config (here: any key of train) is not compared on it.
    cfg, run_dir = stored_run
    recorded = config_to_dict(cfg)
    del recorded["train"]
    save_checkpoint(run_dir / "checkpoint.safetensors", server_round=1, arrays={"w": WEIGHTS}, strategy_state={},
                    state={"config": recorded, "run_key": "k"})
    other = config_from_dict({"rounds": 5, "output_dir": cfg.output_dir, "simulation": {"engine": "ray"},
                              "federation": {"round_timeout_s": 60}})
    assert check_run_dir(other, run_dir, resume=True) == cfg
    _checkpoint(run_dir, cfg)
    assert check_run_dir(other, run_dir, resume=True) == cfg


@pytest.mark.parametrize(("text", "message"), [
    ("", "config.yaml is empty"),
    ("name: breastmnist-fedavg\nseed: 0\noutput_dir: runs\nrounds: 3\n", "config.yaml lacks the key 'data'"),
])
def test_an_empty_or_incomplete_config_yaml_is_refused_not_read_as_defaults(stored_run, text, message):
    # Read as a run folder's config, an empty file was the built-in defaults (20 rounds),
    # which the resume then wrote over config.yaml.
    cfg, run_dir = stored_run
    (run_dir / "config.yaml").write_text(text)
    defaults = config_from_dict({"output_dir": cfg.output_dir, "name": cfg.name})
    # Execute
    with pytest.raises(ResumeError) as info:
        prepare_run_dir(defaults, run_dir, resume=True)
    # Assert
    assert message in str(info.value) and str(run_dir / "config.yaml") in str(info.value)
    assert "restore it" in str(info.value) and "\n" not in str(info.value)
    assert (run_dir / "config.yaml").read_text() == text


def test_a_config_yaml_that_lost_a_key_its_checkpoint_records_is_refused(stored_run):
    cfg, run_dir = stored_run
    _checkpoint(run_dir, cfg)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("  lr: 0.001\n", ""))
    with pytest.raises(ResumeError, match="config.yaml lacks the key 'train.lr'"):
        check_run_dir(cfg, run_dir, resume=True)


def test_a_checkpoint_whose_arrays_are_another_models_is_refused_by_name(stored_run):
    # A FairLoRA checkpoint copied into a FedAvg folder ended in a KeyError at the last round.
    cfg, run_dir = stored_run
    reference = {"w": WEIGHTS, "b": np.zeros(2, np.float32)}
    _checkpoint(run_dir, cfg, arrays=reference)
    check_checkpoint_fits(run_dir, reference)  # its own: fine
    cases = [
        ({"w": WEIGHTS, "b": np.zeros(3, np.float32)}, "its array 'b' has shape [2], the model's [3]"),
        ({"w": WEIGHTS}, "its array 'b' is not in the model"),
        ({"w": WEIGHTS, "b": np.zeros(2, np.float32), "adapters.q": WEIGHTS}, "it has no array 'adapters.q'"),
    ]
    for model, misfit in cases:
        with pytest.raises(ResumeError) as info:
            check_checkpoint_fits(run_dir, model)
        assert f"does not fit this run's model ({misfit})" in str(info.value)
        with pytest.raises(ResumeError, match="shape|not in the model|no array"):  # arrays already loaded
            check_checkpoint_fits(run_dir, model, {k: v.shape for k, v in reference.items()})
    check_checkpoint_fits(tmp := run_dir / "none", reference)  # no checkpoint: nothing to check
    assert not tmp.exists()


def test_the_run_key_is_read_from_the_checkpoint_first(stored_run):
    # Emptying metrics.jsonl (or deleting its first line, as medfed's message on a damaged
    # line advises) made a resume draw a new key: FedBN's sites lost their BatchNorm.
    cfg, run_dir = stored_run
    assert run_key_of(run_dir, None) is None  # nothing yet: the ServerApp makes a key
    (run_dir / "metrics.jsonl").write_text('{"event": "start", "run_key": "from-log"}\n')
    assert run_key_of(run_dir, None) == "from-log"
    assert run_key_of(run_dir, {"run_key": "from-log"}) == "from-log"
    assert run_key_of(run_dir, {}) == "from-log"  # a checkpoint of an older medfed
    # A checkpoint copied from another run of the same study: its key would make the sites
    # load that run's state (FedBN's BatchNorm, Local-only's models).
    with pytest.raises(ResumeError, match="checkpoint.safetensors was written by another run than its metrics.jsonl"):
        run_key_of(run_dir, {"run_key": "from-another-run"})
    (run_dir / "metrics.jsonl").write_text("")
    assert run_key_of(run_dir, {"run_key": "from-checkpoint"}) == "from-checkpoint"  # the log emptied
    (run_dir / "metrics.jsonl").write_text('{"event": "start"}\n')
    assert run_key_of(run_dir, {}) == ""  # a run begun before medfed made keys


def test_a_checkpoint_without_the_run_key_and_a_log_without_a_start_is_refused(stored_run):
    cfg, run_dir = stored_run
    _checkpoint(run_dir, cfg, run_key=None)  # an older medfed's checkpoint
    (run_dir / "metrics.jsonl").write_text('{"event": "round", "round": 1}\n')  # its start line deleted
    with pytest.raises(ResumeError) as info:
        check_run_dir(cfg, run_dir, resume=True)
    assert "its run key, under which the sites keep their local state, is neither in its checkpoint.safetensors" in (
        str(info.value))
    _checkpoint(run_dir, cfg)  # today's checkpoint holds it
    assert check_run_dir(cfg, run_dir, resume=True) == cfg


def test_resume_needs_a_run_directory(tmp_path):
    # Execute
    with pytest.raises(ResumeError) as info:
        check_run_dir(config_from_dict({}), tmp_path / "nothing", resume=True)
    # Assert
    assert "has no config.yaml" in str(info.value)


def test_the_pool_takes_only_replies_the_strategy_may_aggregate(tmp_path):
    # A reply the strategy refuses (here: group counts above its examples) was pooled all the same.
    from flwr.app import Metadata

    from medfed.data import confusion
    from medfed.data.pooled import score_histograms

    def reply(node_id: int, name: str, group_count: int) -> Message:
        y = np.array([0, 1, 0, 1])
        p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
        metrics = MetricRecord({
            "num-examples": 4, "num-examples-group-0": group_count, "acc": 1.0, "num-classes": 2,
            "confusion": [int(v) for v in confusion("binary-class", y, p).reshape(-1)],
            "score-hist": [int(v) for v in score_histograms("binary-class", y, p).reshape(-1)]})
        metadata = Metadata(run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
                            reply_to_message_id=f"i{node_id}", group_id="1", created_at=0.0, ttl=60.0,
                            message_type=MessageType.EVALUATE)
        return Message(content=RecordDict({"metrics": metrics, "site": ConfigRecord({"name": name})}),
                       metadata=metadata)

    recorder = RoundRecorder(MetricsLog(tmp_path / "metrics.jsonl"), task="binary-class")
    recorder.round_started(1)
    # Execute
    recorder.record_exchange("evaluate", {}, [reply(1, "a", 4), reply(2, "b", 3), reply(3, "c", 10**6)])
    record = recorder.round_finished(num_rounds=1)
    # Assert: the pool of a and b, all 8 of their samples right.
    assert record["evaluate_pooled"]["num_examples"] == 8 and record["evaluate_pooled"]["acc"] == 1.0


def test_the_held_out_row_weights_each_hospital_by_its_examples(tmp_path):
    # With one held-out site in every test, an unweighted mean went unnoticed.
    from flwr.app import Metadata

    def reply(node_id: int, name: str, examples: int, acc: float) -> Message:
        metadata = Metadata(run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
                            reply_to_message_id=f"i{node_id}", group_id="1", created_at=0.0, ttl=60.0,
                            message_type=MessageType.EVALUATE)
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": examples, "acc": acc}),
                                           "site": ConfigRecord({"name": name, "held-out": True})}),
                       metadata=metadata)

    recorder = RoundRecorder(MetricsLog(tmp_path / "metrics.jsonl"), task=None)
    recorder.round_started(1)
    # Execute
    recorder.record_exchange("evaluate", {}, [reply(1, "unseen-a", 10, 1.0), reply(2, "unseen-b", 30, 0.0)])
    record = recorder.round_finished(num_rounds=1)
    # Assert
    assert record["held_out"]["acc"] == pytest.approx(0.25) and record["held_out"]["num_examples"] == 40


def test_the_held_out_row_weights_a_groups_figure_by_that_groups_members(tmp_path):
    # Two unseen hospitals with 90 and 10 members of group 0: weighting by all examples gave 0.70, not 0.86.
    from flwr.app import Metadata

    def reply(node_id: int, name: str, members: int, acc: float) -> Message:
        metadata = Metadata(run_id=1, message_id=f"r{node_id}", src_node_id=node_id, dst_node_id=0,
                            reply_to_message_id=f"i{node_id}", group_id="1", created_at=0.0, ttl=60.0,
                            message_type=MessageType.EVALUATE)
        metrics = MetricRecord({"num-examples": 100, "num-examples-group-0": members, "acc": acc,
                                "acc-group-0": acc})
        return Message(content=RecordDict({"metrics": metrics, "site": ConfigRecord({"name": name, "held-out": True})}),
                       metadata=metadata)

    recorder = RoundRecorder(MetricsLog(tmp_path / "metrics.jsonl"), task=None)
    recorder.round_started(1)
    recorder.record_exchange("evaluate", {}, [reply(1, "unseen-a", 90, 0.9), reply(2, "unseen-b", 10, 0.5)])
    held_out = recorder.round_finished(num_rounds=1)["held_out"]
    assert held_out["acc"] == pytest.approx(0.7)
    assert held_out["acc-group-0"] == pytest.approx(0.86)
    assert held_out["es-acc"] == pytest.approx(0.7 / (1 + 0.16))


def _roster(roles: dict):
    from medfed.server.held_out import SiteRoster

    roster = SiteRoster(grid=None)
    roster.roles = dict(roles)
    return roster


def test_sampling_draws_other_sites_each_round_and_the_same_ones_in_every_run(tmp_path):
    # A seed without the round number would train the same half of the sites in every round.
    from medfed.server.held_out import SiteRole

    grid = LocalGrid(_echo_app(), [{"site-name": f"site-{i}"} for i in range(10)], {})
    roster = _roster({node: SiteRole(f"site-{node - 2}", False) for node in grid.get_node_ids()})

    def draws(seed: int) -> list[frozenset[int]]:
        strategy = RoundOffsetStrategy(FedAvg(fraction_train=0.5, min_train_nodes=2, min_available_nodes=2), 0,
                                       RoundRecorder(MetricsLog(tmp_path / f"m{seed}.jsonl")), roster, seed=seed)
        return [frozenset(m.metadata.dst_node_id for m in strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid))
                for r in range(1, 6)]

    first = draws(0)
    assert all(len(sampled) == 5 for sampled in first)
    assert len(set(first)) > 1  # not the same sites every round
    assert draws(0) == first  # the same sites in every run
    assert draws(1) != first


def test_held_out_sites_are_evaluated_unless_their_data_does_not_fit(tmp_path):
    from medfed.server.held_out import SiteRole

    roster = _roster({2: SiteRole("site-0", False), 3: SiteRole("unseen", True),
                      4: SiteRole("unseen-bad", True, "labels out of range")})
    assert roster.held_out_nodes == frozenset({3})


def test_the_strategy_sees_the_nodes_by_site_name_whatever_their_ids():
    # The engines number nodes differently: by name, both sample the same sites. Unnamed nodes last.
    from medfed.server.held_out import NodeView

    grid = LocalGrid(_echo_app(), [{"site-name": "x"}] * 4, {})  # node ids 2, 3, 4, 5
    view = NodeView(grid, hidden=set(), names={2: "site-2", 3: "site-0", 4: "site-1"})
    assert list(view.get_node_ids()) == [3, 4, 2, 5]
