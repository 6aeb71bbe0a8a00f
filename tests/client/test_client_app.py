"""The ClientApp's replies: what they carry, what they never carry, and that they repeat."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from medfed.client.client_app import app as client_app
from medfed.data.pooled import SCORE_BINS
from medfed.config import to_run_config
from medfed.models import create_model
from medfed.server.server_app import train_config
from medfed.simulation.local import LocalGrid
from medfed.transfer import PACKED_KEY, from_wire

METRIC_KEYS = {"num-examples", "loss", "acc", "auc", "balanced_acc"}


@pytest.fixture(scope="module")
def global_arrays() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _grid(cfg) -> LocalGrid:
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    return LocalGrid(client_app, nodes, to_run_config(cfg))


@pytest.fixture()
def grid(tiny_root, tiny_config, tmp_path) -> LocalGrid:
    return _grid(tiny_config(tiny_root, tmp_path))


#: The training settings the server sends every round (here: the tiny config's).
SETTINGS = {"local-epochs": 1, "batch-size": 8, "optimizer": "adamw", "lr": 1e-3, "weight-decay": 0.05,
            "momentum": 0.9, "run-key": ""}


def _message(arrays, message_type: str, node_id: int = 2, **config) -> Message:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1, **SETTINGS, **config})})
    return Message(content, node_id, message_type)


def test_message_settings_are_those_the_server_sends(tiny_root, tiny_config, tmp_path):
    # The helper above must speak the server's language, key for key and value for value.
    assert dict(train_config(tiny_config(tiny_root, tmp_path))) == SETTINGS


def _exchange(grid: LocalGrid, message: Message) -> Message:
    (reply,) = grid.send_and_receive([message])
    assert not reply.has_error(), reply.error.reason
    return reply


def test_train_reply_carries_weights_metrics_and_site_name_only(grid, global_arrays):
    # Execute
    reply = _exchange(grid, _message(global_arrays, MessageType.TRAIN, node_id=2))
    # Assert
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    assert list(content["arrays"].keys()) == [PACKED_KEY]  # one array on the wire (medfed.transfer)
    assert list(from_wire(content["arrays"]).keys()) == list(global_arrays)
    (metrics,) = content.metric_records.values()
    assert set(metrics) == METRIC_KEYS
    assert metrics["num-examples"] == 8
    site = content["site"]
    assert site["name"] == "site-0" and site["time-s"] > 0
    # Nothing else is text: no paths, file names or labels leave the site.
    strings = [v for record in content.config_records.values() for v in record.values() if isinstance(v, str)]
    assert strings == ["site-0"]
    # Flower's FedAvg accepts it as is.
    validate_message_reply_consistency([content], "num-examples", check_arrayrecord=True)


def test_training_changes_the_weights_and_repeats_exactly(grid, global_arrays):
    # Execute
    first = from_wire(_exchange(grid, _message(global_arrays, MessageType.TRAIN)).content["arrays"])
    again = from_wire(_exchange(grid, _message(global_arrays, MessageType.TRAIN)).content["arrays"])
    # Assert
    assert any(not np.array_equal(first[k].numpy(), global_arrays[k]) for k in global_arrays)
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in global_arrays)


def test_a_site_with_less_than_one_batch_says_so_once(grid, global_arrays, caplog):
    # A small Dirichlet alpha can leave a site a single image; its updates are noise.
    import logging

    from medfed.client import client_app as module

    module._WARNED_SMALL.discard("site-0")
    for _ in range(2):
        _exchange(grid, _message(global_arrays, MessageType.TRAIN, node_id=2, **{"batch-size": 16}))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["[site-0] trains on 8 image(s), fewer than one batch (16): its updates and metrics are "
                        "mostly noise (a small federation.dirichlet_alpha, or a quantity skew, can leave a site "
                        "this small)."]


def test_proximal_term_keeps_weights_closer_to_the_global_model(tiny_root, tiny_config, tmp_path, global_arrays):
    # Prepare: 4 steps (the proximal gradient is zero at the first step, where w = w_global);
    # a FedProx experiment, so the site applies FedProx's client hooks.
    grid = _grid(tiny_config(tiny_root, tmp_path, strategy={"name": "fedprox"}))
    settings = {"lr": 0.01, "batch-size": 2}
    # Execute: the same round with and without FedProx's proximal term (a large mu).
    plain = from_wire(_exchange(grid, _message(global_arrays, MessageType.TRAIN, **settings)).content["arrays"])
    proximal = {**settings, "proximal-mu": 100.0}
    prox = from_wire(_exchange(grid, _message(global_arrays, MessageType.TRAIN, **proximal)).content["arrays"])
    # Assert
    def distance(record):
        return sum(float(((record[k].numpy() - v) ** 2).sum()) for k, v in global_arrays.items() if v.dtype.kind == "f")

    assert distance(prox) < distance(plain)


def test_evaluate_reply_carries_metrics_and_confusion_matrix(tiny_root, tiny_config, tmp_path, global_arrays):
    # Prepare: a study that pools its sites' test sets (off by default: see the next tests)
    grid = _grid(tiny_config(tiny_root, tmp_path, federation={"pooled_test_metrics": True}))
    # Execute
    reply = _exchange(grid, _message(global_arrays, MessageType.EVALUATE, node_id=4))
    # Assert
    content = reply.content
    assert not content.array_records
    (metrics,) = content.metric_records.values()
    assert set(metrics) == METRIC_KEYS | {"confusion", "num-classes", "score-hist"}
    assert metrics["num-examples"] == 4 and metrics["num-classes"] == 2
    assert len(metrics["score-hist"]) == 2 * SCORE_BINS and sum(metrics["score-hist"]) == 4  # binary: one class
    assert len(metrics["confusion"]) == 4 and sum(metrics["confusion"]) == 4
    assert content["site"]["name"] == "site-2"
    validate_message_reply_consistency([content], "num-examples", check_arrayrecord=False)


def test_training_instruction_without_settings_is_an_error_reply(grid, global_arrays):
    # Prepare: an instruction without the server's training settings (no fallback at the site).
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in global_arrays.items()}),
                          "config": ConfigRecord({"server-round": 1})})
    # Execute
    (reply,) = grid.send_and_receive([Message(content, 2, MessageType.TRAIN)])
    # Assert
    assert reply.has_error() and "ValueError at the site" in reply.error.reason


def test_site_failure_becomes_an_error_reply(tiny_root, tiny_config, tmp_path, global_arrays):
    # Prepare: a node whose config names no data.
    grid = LocalGrid(client_app, [{}], to_run_config(tiny_config(tiny_root, tmp_path)))
    # Execute
    (reply,) = grid.send_and_receive([_message(global_arrays, MessageType.TRAIN)])
    # Assert
    assert reply.has_error()
    assert "SiteDataError at the site; the site's log has the details" in reply.error.reason


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE])
def test_an_error_at_a_site_reaches_the_server_without_the_sites_paths(
    message_type, tiny_root, tiny_config, tmp_path, global_arrays, caplog
):
    # Prepare: a hospital whose data folder is gone; Flower sends an exception's text as the
    # error reason, and this one names the folder.
    folder = tmp_path / "hospital-a" / "patients-2026"
    grid = LocalGrid(client_app, [{"data-path": str(folder)}], to_run_config(tiny_config(tiny_root, tmp_path)))
    # Execute
    (reply,) = grid.send_and_receive([_message(global_arrays, message_type)])
    # Assert: the server learns the error's type; the site's log has the folder.
    assert reply.has_error() and "at the site; the site's log has the details" in reply.error.reason
    assert "patients-2026" not in reply.error.reason and "hospital-a" not in reply.error.reason
    assert "patients-2026" in caplog.text


def test_the_test_loss_is_plain_cross_entropy_whatever_the_sites_training_classes(
    tiny_root, tiny_config, tmp_path, global_arrays
):
    # The test loss took the training loss's class weights, from each site's own training
    # counts: two sites with the same test images reported different losses (and a class
    # the site never trained on weighed nothing).
    data = dict(np.load(tiny_root / "breastmnist.npz"))
    folders = []
    for name, train_class in (("only-benign", 0), ("only-malignant", 1)):
        folder = tmp_path / name
        folder.mkdir()
        np.savez(folder / "breastmnist.npz", **{**data, "train_labels": np.full_like(data["train_labels"], train_class)})
        folders.append(folder)
    grid = LocalGrid(client_app, [{"data-path": str(folder)} for folder in folders],
                     to_run_config(tiny_config(tiny_root, tmp_path, federation={"num_sites": 2, "partition": "iid"})))
    replies = grid.send_and_receive([_message(global_arrays, MessageType.EVALUATE, node_id=node)
                                     for node in grid.get_node_ids()])
    losses = []
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        (metrics,) = reply.content.metric_records.values()
        losses.append(metrics["loss"])
    assert len(losses) == 2 and np.isfinite(losses).all() and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_an_input_error_at_a_site_is_logged_in_one_line_a_bug_with_its_traceback(
    tiny_root, tiny_config, tmp_path, global_arrays, caplog
):
    # A missing data folder is the site's input: its line says all (the simulate console
    # showed a traceback per site); a bug keeps its traceback for whoever fixes it.
    grid = LocalGrid(client_app, [{"data-path": str(tmp_path / "missing")}], to_run_config(tiny_config(tiny_root, tmp_path)))
    (reply,) = grid.send_and_receive([_message(global_arrays, MessageType.TRAIN)])
    assert reply.has_error()
    (record,) = [r for r in caplog.records if "failed at this site" in r.getMessage()]
    assert not record.exc_info


def test_a_global_model_that_does_not_fit_the_sites_model_is_refused_in_words(grid, global_arrays):
    # Another medfed version or study setting at the server: the server saw only
    # "RuntimeError at the site"; the arrays' names and shapes are no site data.
    name = next(iter(global_arrays))
    partial = {k: v for k, v in global_arrays.items() if k != name}
    (reply,) = grid.send_and_receive([_message(partial, MessageType.TRAIN)])
    assert reply.has_error()
    assert "the global model does not fit this site's model" in reply.error.reason
    assert name in reply.error.reason and "run the server's medfed version at the site" in reply.error.reason


def test_score_histograms_stay_at_the_sites_unless_the_study_asks(tiny_root, tiny_config, tmp_path, global_arrays):
    # A 200-bin histogram of a small test split tells each image's label, group and score:
    # a study sends them only when it sets federation.pooled_test_metrics (off by default).
    cfg = tiny_config(tiny_root, tmp_path, federation={"num_sites": 3, "partition": "iid", "groups": ["a", "b"]})
    assert cfg.federation.pooled_test_metrics is False
    reply = _exchange(_grid(cfg), _message(global_arrays, MessageType.EVALUATE, node_id=4))
    (metrics,) = reply.content.metric_records.values()
    assert not [key for key in metrics if key.startswith(("score-hist", "confusion-group-"))]
    assert {"acc", "auc", "acc-group-0", "num-examples-group-1", "confusion"} <= set(metrics)


def test_a_training_instruction_without_its_round_says_what_it_lacks(grid, global_arrays, caplog):
    # It failed on config["server-round"] (a bare KeyError) before the check that names what is missing.
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in global_arrays.items()}),
                          "config": ConfigRecord(SETTINGS)})
    (reply,) = grid.send_and_receive([Message(content, 2, MessageType.TRAIN)])
    assert reply.has_error() and "ValueError at the site" in reply.error.reason
    assert "The training instruction lacks ['server-round']" in caplog.text


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE])
def test_the_sites_log_shows_the_round_of_the_study_and_marks_its_last(grid, global_arrays, caplog, message_type):
    # A hospital's operator reads how far the study is; 'medfed client' reads the mark
    # (LAST_ROUND_MARK) to tell a finished study from a server that went away.
    import logging

    from medfed.client import LAST_ROUND_MARK

    caplog.set_level(logging.INFO)
    for server_round in (1, 2):  # the tiny config's study has 2 rounds
        _exchange(grid, _message(global_arrays, message_type, **{"server-round": server_round}))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[site-0] round")]
    assert [line.split()[2].rstrip(":") for line in lines] == ["1/2", "2/2"]
    assert [LAST_ROUND_MARK in line for line in lines] == [False, True]
    if message_type == MessageType.EVALUATE:
        assert "test acc" in lines[0] and lines[0].endswith("on 4 image(s)")


def test_a_run_key_reused_by_another_study_does_not_read_the_sites_private_state(tiny_root, tiny_config, tmp_path,
                                                                                 global_arrays):
    # A Local-only study keeps each site's whole model at the site. A FedAvg study whose server
    # sent the same run key made the site load that model and send it back, whole.
    node = [{"data-path": str(tiny_root), "site-name": "alpha", "state-dir": str(tmp_path / "state")}]
    local = tiny_config(tiny_root, tmp_path, strategy={"name": "local"}, rounds=4)
    grid = LocalGrid(client_app, node, to_run_config(local))
    (alpha,) = grid.get_node_ids()
    for server_round in (1, 2):
        _exchange(grid, _message(global_arrays, MessageType.TRAIN, node_id=alpha, **{"server-round": server_round,
                                                                                     "run-key": "aaaa"}))
    # Execute: another study, the same key, the same site (a new process: nothing in memory).
    fedavg = tiny_config(tiny_root, tmp_path, rounds=4)
    (reply,) = LocalGrid(client_app, node, to_run_config(fedavg)).send_and_receive(
        [_message(global_arrays, MessageType.TRAIN, node_id=alpha, **{"server-round": 3, "run-key": "aaaa"})])
    # Assert: refused, in words that name no folder.
    assert reply.has_error() and "keeps another study's state under this run key" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason
    # ... while the study itself, resumed with more rounds, reads its state on.
    resumed = tiny_config(tiny_root, tmp_path, strategy={"name": "local"}, rounds=6)
    _exchange(LocalGrid(client_app, node, to_run_config(resumed)),
              _message(global_arrays, MessageType.TRAIN, node_id=alpha, **{"server-round": 3, "run-key": "aaaa"}))


def test_a_round_beyond_the_studys_is_refused(grid, global_arrays):
    (reply,) = grid.send_and_receive([_message(global_arrays, MessageType.TRAIN, **{"server-round": 3})])
    assert reply.has_error() and "round 3 is beyond the study's 2 rounds" in reply.error.reason


def test_a_site_loads_only_the_pretrained_model_the_server_started_from(tiny_root, tiny_config, tmp_path,
                                                                        global_arrays):
    # model.init_from named any path on the site's machine (FairLoRA loads its backbone at
    # the site): another file there, a site's private state say, was loaded in its place, and
    # the error told the server which files exist.
    from medfed.models.pretrained import checkpoint_digest
    from medfed.server.checkpoint import save_arrays
    from medfed.strategies.hooks import INIT_DIGEST_KEY

    servers = tmp_path / "server.safetensors"
    save_arrays(servers, global_arrays)
    other = tmp_path / "other.safetensors"
    save_arrays(other, {k: v + 1 if v.dtype.kind == "f" else v for k, v in global_arrays.items()})
    refusals = []
    for path in (other, tmp_path / "missing.safetensors"):
        cfg = tiny_config(tiny_root, tmp_path, strategy={"name": "fairlora"},
                          model={"name": "medvit_v2_nano", "init_from": str(path)})
        grid = LocalGrid(client_app, [{"data-path": str(tiny_root), "site-name": "alpha"}], to_run_config(cfg))
        message = _message(global_arrays, MessageType.EVALUATE, **{INIT_DIGEST_KEY: checkpoint_digest(servers)})
        (reply,) = grid.send_and_receive([message])
        refusals.append(reply.error.reason)
    # Assert: both refused, in the same words, naming no file.
    assert refusals[0] == refusals[1]
    assert "the study's pretrained model (model.init_from) is not at this site as the server has it" in refusals[0]
    assert str(tmp_path) not in refusals[0]


def test_a_site_refuses_a_pretrained_model_named_without_its_sha256(tiny_root, tiny_config, tmp_path, global_arrays):
    # A server that leaves the digest out would make the site load any file at that path
    # (a Local-only site's private model, say) and send FairLoRA's head from it back.
    from medfed.server.checkpoint import save_arrays

    private = tmp_path / "private.safetensors"
    save_arrays(private, global_arrays)
    cfg = tiny_config(tiny_root, tmp_path, strategy={"name": "fairlora"},
                      model={"name": "medvit_v2_nano", "init_from": str(private)})
    grid = LocalGrid(client_app, [{"data-path": str(tiny_root), "site-name": "alpha"}], to_run_config(cfg))
    # Execute
    (reply,) = grid.send_and_receive([_message(global_arrays, MessageType.EVALUATE)])
    # Assert
    assert reply.has_error()
    assert "names a pretrained model (model.init_from) but the instruction carries no SHA-256" in reply.error.reason
