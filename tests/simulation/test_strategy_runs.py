"""Strategy plug-ins end to end in one process (LocalGrid): FedBN keeps BatchNorm at the
sites, FairLoRA sends only adapters and head, and both resume bit-identically after a
crash (site-local state comes back from the run folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from medfed.client.client_app import app as client_app
from medfed.server.checkpoint import load_arrays, load_checkpoint, save_arrays
from medfed.server.metrics_log import load_run_metrics
from medfed.server.server_app import initial_model_arrays
from medfed.simulation.local import run_local
from medfed.strategies.fedbn import batchnorm_keys
from medfed.models import create_model


class _Killed(BaseException):
    """Stands for the process dying: no handler in Flower or medfed catches it."""


def _app_that_dies(round_to_die: int, site_to_die: int) -> ClientApp:
    """Dies in ``round_to_die`` when the site with that partition id starts training
    (the sites before it in that round have already written their round's state)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if msg.content["config"]["server-round"] == round_to_die and context.node_config["partition-id"] == site_to_die:
            raise _Killed
        return client_app(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return client_app(msg, context)

    return app


def _site_states(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """The newest state file of every site (each site has one folder: this run's key)."""
    states = {}
    for folder in sorted((run_dir / "site-state").iterdir()):
        (run_folder,) = folder.iterdir()
        newest = sorted(run_folder.glob("round-*.safetensors"))[-1]
        states[f"{folder.name}/{newest.name}"] = load_file(str(newest))
    return states


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []


def _assert_resume_is_bit_identical(cfg, uninterrupted: Path, tmp_path: Path, metric_records) -> Path:
    with pytest.raises(_Killed):
        run_local(cfg, client_app=_app_that_dies(round_to_die=2, site_to_die=2))
    run_dir = tmp_path / cfg.name
    assert load_checkpoint(run_dir / "checkpoint.safetensors").server_round == 1
    run_local(cfg, resume=True)
    # The resume sent the run's key of its first start: its sites found their state under it.
    keys = [start["run_key"] for start in load_run_metrics(run_dir).starts]
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 16
    assert {p.name for p in (run_dir / "site-state").glob("*/*")} <= {keys[0]}  # FairLoRA sites keep none
    _assert_same_arrays(load_arrays(run_dir / "model.safetensors"), load_arrays(uninterrupted / "model.safetensors"))
    assert metric_records(run_dir) == metric_records(uninterrupted)
    return run_dir


# --- FedBN ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fedbn_run(tiny_root, tiny_config, tmp_path_factory) -> Path:
    return run_local(tiny_config(tiny_root, tmp_path_factory.mktemp("fedbn"), strategy={"name": "fedbn"}))


def test_fedbn_keeps_batchnorm_at_the_sites_and_averages_the_rest(fedbn_run, tiny_root, tiny_config):
    # Prepare
    cfg = tiny_config(tiny_root, fedbn_run.parent, strategy={"name": "fedbn"})
    initial = initial_model_arrays(cfg)
    bn_keys = set(batchnorm_keys(create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)))
    # Execute
    final = load_arrays(fedbn_run / "model.safetensors")
    states = _site_states(fedbn_run)
    # Assert: the server never received BatchNorm (its copy is the initial one), the rest moved.
    # (Counters come back from the checkpoint as shape (1,) instead of (): compare values.)
    assert bn_keys and all(np.array_equal(final[k].reshape(initial[k].shape), initial[k]) for k in bn_keys)
    assert any(not np.array_equal(final[k], initial[k]) for k in set(final) - bn_keys)
    assert list(states) == [f"site-{i}/round-000002.safetensors" for i in range(3)]
    site_0, site_1 = states["site-0/round-000002.safetensors"], states["site-1/round-000002.safetensors"]
    assert set(site_0) == bn_keys
    running_means = [k for k in bn_keys if k.endswith("running_mean")]
    assert any(not np.array_equal(site_0[k], site_1[k]) for k in running_means)
    # Replies carried no BatchNorm: far fewer bytes came back than went out.
    first = load_run_metrics(fedbn_run).site_record(1, "train", "site-0")
    assert first["bytes_received"] < first["bytes_sent"]


def test_fedbn_run_killed_in_round_2_resumes_bit_identically(fedbn_run, tiny_root, tiny_config, tmp_path, metric_records):
    # Prepare
    cfg = tiny_config(tiny_root, tmp_path, strategy={"name": "fedbn"})
    # Execute
    run_dir = _assert_resume_is_bit_identical(cfg, fedbn_run, tmp_path, metric_records)
    # Assert: and every site ends with the same BatchNorm as in the uninterrupted run.
    resumed, uninterrupted = _site_states(run_dir), _site_states(fedbn_run)
    assert list(resumed) == list(uninterrupted)
    for key in resumed:
        _assert_same_arrays(resumed[key], uninterrupted[key])


def test_fedbn_resume_finds_the_sites_state_without_the_first_line_of_metrics_jsonl(fedbn_run, tiny_root, tiny_config,
                                                                                    tmp_path, metric_records):
    # The run key lived only in the first "start" line: deleting it (as medfed's message on a
    # damaged line advises) made the resume draw a new key, and the sites lost their BatchNorm.
    cfg = tiny_config(tiny_root, tmp_path, strategy={"name": "fedbn"})
    with pytest.raises(_Killed):
        run_local(cfg, client_app=_app_that_dies(round_to_die=2, site_to_die=2))
    run_dir = tmp_path / cfg.name
    first_key = load_run_metrics(run_dir).starts[0]["run_key"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[1:]))
    # Execute
    run_local(cfg, resume=True)
    # Assert
    assert [start["run_key"] for start in load_run_metrics(run_dir).starts] == [first_key]
    _assert_same_arrays(load_arrays(run_dir / "model.safetensors"), load_arrays(fedbn_run / "model.safetensors"))
    resumed, uninterrupted = _site_states(run_dir), _site_states(fedbn_run)
    assert list(resumed) == list(uninterrupted)
    for key in resumed:
        _assert_same_arrays(resumed[key], uninterrupted[key])


# --- FairLoRA ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone(tiny_root, tiny_config, tmp_path_factory) -> Path:
    """A backbone checkpoint (random weights are enough to test the mechanics)."""
    path = tmp_path_factory.mktemp("backbone") / "model.safetensors"
    save_arrays(path, initial_model_arrays(tiny_config(tiny_root, path.parent)))
    return path


def _fairlora_config(tiny_root, tiny_config, out: Path, backbone: Path):
    return tiny_config(
        tiny_root, out, strategy={"name": "fairlora", "params": {"num_groups": 2, "rank": 4}},
        model={"name": "medvit_v2_nano", "init_from": str(backbone)},
    )


@pytest.fixture(scope="module")
def fairlora_run(tiny_root, tiny_config, tmp_path_factory, backbone) -> Path:
    return run_local(_fairlora_config(tiny_root, tiny_config, tmp_path_factory.mktemp("fairlora"), backbone))


def test_fairlora_sends_adapters_and_head_within_5_percent_of_fedavg_bytes(fairlora_run, backbone):
    # Prepare
    full_model_bytes = sum(a.nbytes for a in load_arrays(backbone).values())
    # Execute
    record = load_run_metrics(fairlora_run).site_record(1, "train", "site-0")
    travelling = load_arrays(fairlora_run / "model.safetensors")
    # Assert
    assert record["bytes_received"] <= 0.05 * full_model_bytes
    assert record["bytes_sent"] <= 0.05 * full_model_bytes
    assert all(k.startswith("adapters.") or k.startswith("backbone.head.") for k in travelling)
    assert any(k.endswith(".S") for k in travelling)


def test_fairlora_run_killed_in_round_2_resumes_bit_identically(fairlora_run, tiny_root, tiny_config, tmp_path, backbone, metric_records):
    cfg = _fairlora_config(tiny_root, tiny_config, tmp_path, backbone)
    _assert_resume_is_bit_identical(cfg, fairlora_run, tmp_path, metric_records)


def test_a_site_whose_first_reply_is_an_error_is_recorded_by_its_name(tiny_root, tiny_config, tmp_path):
    # Prepare: site-2 fails in round 1, before any reply of it told the server its name
    # (the dropout and the report said "node-<id>").
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if context.node_config["partition-id"] == 2:
            raise RuntimeError("scanner feed lost")
        return client_app(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return client_app(msg, context)

    @app.query()
    def query(msg, context):
        return client_app(msg, context)

    cfg = tiny_config(tiny_root, tmp_path, rounds=1, federation={"num_sites": 3, "partition": "iid", "min_sites": 2})
    # Execute
    run_dir = run_local(cfg, client_app=app)
    # Assert
    (dropout,) = load_run_metrics(run_dir).left_out
    assert (dropout["site"], dropout["phase"]) == ("site-2", "train")
    assert "scanner feed lost" in dropout["reason"]


def test_a_run_whose_every_site_diverges_says_to_lower_the_learning_rate(tiny_root, tiny_config, tmp_path):
    # Prepare: a learning rate that makes every site's loss infinite in round 1.
    from medfed.server.quorum import QuorumError

    cfg = tiny_config(tiny_root, tmp_path, rounds=1, train={"local_epochs": 1, "batch_size": 2, "lr": 1e6,
                                                             "optimizer": "sgd"},
                      federation={"num_sites": 3, "partition": "iid", "round_retries": 0})
    # Execute / Assert: not "bring the sites back and resume" (they replied; a resume diverges again).
    with pytest.raises(QuorumError, match=r"Every site's training diverged \(a NaN or infinite loss or update\): "
                                          r"start a new run \(another name or output_dir\) with a lower train\.lr; "
                                          r"a resume would repeat the same round\.$"):
        run_local(cfg)
