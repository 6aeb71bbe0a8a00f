"""The ServerApp and ClientApp together, in one process (LocalGrid, no Ray): fast checks of
the run files, reproducibility and resume. The same checks through Flower's simulation
engine live in test_end_to_end.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp

from medfed.client.client_app import app as client_app
from medfed.server.checkpoint import load_arrays, load_checkpoint
from medfed.server.metrics_log import load_run_metrics
from medfed.server.server_app import initial_model_arrays
from medfed.simulation.local import run_local


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_arrays(a), load_arrays(b)
    assert list(first) == list(second)
    different = [k for k in first if not np.array_equal(first[k], second[k])]
    assert different == []


@pytest.fixture(scope="module")
def local_run_and_log(tiny_root, tiny_config, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run, and what it logged through Flower's logger."""
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    class Lines(logging.Handler):
        lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    handler = Lines()
    FLOWER_LOGGER.addHandler(handler)
    try:
        cfg = tiny_config(tiny_root, tmp_path_factory.mktemp("local"))
        return run_local(cfg), handler.lines
    finally:
        FLOWER_LOGGER.removeHandler(handler)


@pytest.fixture(scope="module")
def local_run(local_run_and_log) -> Path:
    return local_run_and_log[0]


def test_flowers_start_line_names_the_experiments_strategy_not_medfeds_wrapper(local_run_and_log):
    lines = local_run_and_log[1]
    assert "Starting FedAvg strategy:" in lines
    assert not [line for line in lines if "RoundOffsetStrategy" in line or "QuorumGuard" in line]


def test_local_run_writes_config_metrics_checkpoint_model_and_report(local_run, tiny_root, tiny_config):
    # Execute
    run = load_run_metrics(local_run)
    events = [json.loads(line)["event"] for line in (local_run / "metrics.jsonl").read_text().splitlines()]
    # Assert
    assert (local_run / "config.yaml").is_file() and (local_run / "report.html").is_file()
    assert events[0] == "start" and events[-1] == "end"
    assert run.rounds == [1, 2] and run.sites == ["site-0", "site-1", "site-2"]
    assert len(run.site_records) == 2 * 3 * 2  # rounds x sites x (train, evaluate)
    assert run.site_record(2, "evaluate", "site-1")["confusion"] is not None
    assert load_checkpoint(local_run / "checkpoint.safetensors").server_round == 2
    reference = initial_model_arrays(tiny_config(tiny_root, local_run))
    model = load_arrays(local_run / "model.safetensors")
    assert {k: v.dtype for k, v in model.items()} == {k: v.dtype for k, v in reference.items()}


def test_same_config_gives_identical_metrics_and_weights(local_run, tiny_root, tiny_config, tmp_path, metric_records):
    # Execute
    again = run_local(tiny_config(tiny_root, tmp_path))
    # Assert
    assert metric_records(again) == metric_records(local_run)
    assert_same_weights(again / "model.safetensors", local_run / "model.safetensors")


class _Killed(BaseException):
    """Stands for the process dying: no handler in Flower or medfed catches it."""


def _app_that_dies_in_round(round_to_die: int) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if msg.content["config"]["server-round"] == round_to_die:
            raise _Killed
        return client_app(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return client_app(msg, context)

    return app


def test_run_interrupted_in_round_2_resumes_to_identical_weights(local_run, tiny_root, tiny_config, tmp_path, metric_records,
                                                                 capsys):
    # Prepare: a run that dies when round 2 starts, after round 1's checkpoint.
    cfg = tiny_config(tiny_root, tmp_path)
    with pytest.raises(_Killed):
        run_local(cfg, client_app=_app_that_dies_in_round(2))
    run_dir = tmp_path / cfg.name
    assert load_checkpoint(run_dir / "checkpoint.safetensors").server_round == 1
    capsys.readouterr()
    # Execute
    run_local(cfg, resume=True)
    # Assert: Flower counts the rounds left ([ROUND 1/1]); medfed says which rounds they are.
    assert "medfed: resuming after round 1: rounds 2 to 2 (Flower's [ROUND i/1] counts the rounds left)" in (
        capsys.readouterr().out)
    assert_same_weights(run_dir / "model.safetensors", local_run / "model.safetensors")
    assert metric_records(run_dir) == metric_records(local_run)
    starts = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"start"' in l]
    assert [s["resumed_from_round"] for s in starts] == [0, 1]


def test_resume_with_more_rounds_continues_the_round_count(local_run, tiny_root, tiny_config, tmp_path, metric_records):
    # Prepare: a copy of the finished 2-round run.
    run_dir = tmp_path / "copy"
    shutil.copytree(local_run, run_dir)
    # Execute
    run_local(tiny_config(tiny_root, tmp_path, rounds=3), run_dir=run_dir, resume=True)
    # Assert
    assert load_run_metrics(run_dir).rounds == [1, 2, 3]
    assert load_checkpoint(run_dir / "checkpoint.safetensors").server_round == 3
    assert metric_records(run_dir)[: len(metric_records(local_run))] == metric_records(local_run)


def test_a_checkpoint_of_another_model_is_refused_by_the_server_app(local_run, tiny_root, tiny_config, tmp_path):
    # A FairLoRA checkpoint copied into a FedAvg folder ended in a KeyError traceback.
    from medfed.server.checkpoint import save_checkpoint
    from medfed.server.resume import ResumeError

    run_dir = tmp_path / "copy"
    shutil.copytree(local_run, run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoint.safetensors")
    foreign = {"adapters.0.lora_a": np.zeros((4, 2), np.float32), **checkpoint.arrays}
    save_checkpoint(run_dir / "checkpoint.safetensors", server_round=checkpoint.server_round, arrays=foreign,
                    strategy_state=checkpoint.strategy_state, state=checkpoint.state)
    # Execute
    with pytest.raises(ResumeError, match=r"does not fit this run's model \(its array 'adapters.0.lora_a' is not in the "
                                          r"model\)"):
        run_local(tiny_config(tiny_root, tmp_path, rounds=3), run_dir=run_dir, resume=True)


@pytest.mark.parametrize("resume", [True, False])
def test_simulate_refuses_a_run_folder_another_process_holds(local_run, tiny_root, tiny_config, tmp_path, resume):
    # Two `medfed simulate --resume` on one folder both ran: metrics.jsonl got three start
    # records, rounds twice and two end records, and both wrote the checkpoint.
    from medfed.server.run_lock import RunFolderInUse, run_folder_lock
    from medfed.simulation import simulate

    run_dir = tmp_path / "copy"
    if resume:
        shutil.copytree(local_run, run_dir)
    cfg = tiny_config(tiny_root, tmp_path, rounds=3, simulation={"cpus_per_site": 1.0, "engine": "inprocess"})
    with run_folder_lock(run_dir):  # as another medfed process would
        before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir())
        # Execute
        with pytest.raises(RunFolderInUse, match="is in use by another medfed process"):
            simulate(cfg, run_dir=run_dir, resume=resume)
        # Assert: nothing written
        assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir()) == before


def test_a_run_begun_with_a_relative_data_root_resumes_from_another_folder(tiny_root, tiny_config, tmp_path, monkeypatch):
    from medfed.config import load_config
    from medfed.simulation import simulate

    # Prepare: one round, started beside the data with data.root given relative.
    monkeypatch.chdir(tiny_root.parent)
    cfg = tiny_config(Path(tiny_root.name), tmp_path, rounds=1,
                      simulation={"cpus_per_site": 1.0, "engine": "inprocess"})
    run_dir = simulate(cfg)
    stored = load_config(run_dir / "config.yaml", run_folder=True)
    assert stored.data.root == str(tiny_root.resolve())
    # Execute: one more round, resumed from somewhere else.
    monkeypatch.chdir(tmp_path)
    simulate(load_config(run_dir / "config.yaml", ["rounds=2"], run_folder=True), run_dir=run_dir, resume=True)
    # Assert
    assert load_run_metrics(run_dir).rounds == [1, 2]
    # Execute: a resume given the relative config again, from beside the data.
    monkeypatch.chdir(tiny_root.parent)
    simulate(tiny_config(Path(tiny_root.name), tmp_path, rounds=3, simulation={"cpus_per_site": 1.0, "engine": "inprocess"}),
             run_dir=run_dir, resume=True)
    # Assert: the stored root stays absolute.
    assert load_config(run_dir / "config.yaml", run_folder=True).data.root == str(tiny_root.resolve())


def test_a_relative_data_root_given_again_on_resume_is_the_stored_absolute_one(local_run, tiny_root, tiny_config, tmp_path, monkeypatch):
    from medfed.server.resume import check_run_dir

    run_dir = tmp_path / "copy"
    shutil.copytree(local_run, run_dir)
    monkeypatch.chdir(tiny_root.parent)
    relative = tiny_config(Path(tiny_root.name), tmp_path, rounds=3)
    assert check_run_dir(relative, run_dir, resume=True) is not None


def test_a_round_whose_aggregate_is_not_finite_keeps_the_model_and_says_so(tiny_root, tiny_config, tmp_path):
    # A round that kept the global model looked like any other in metrics.jsonl and the report.
    from flwr.app import Array, ArrayRecord

    from medfed.strategies import registry
    from medfed.strategies.fedavg import FedAvg

    class OverflowsInRound2(FedAvg):
        def aggregate_valid_replies(self, server_round, replies):
            arrays, metrics = super().aggregate_valid_replies(server_round, replies)
            if server_round == 2:
                arrays = ArrayRecord({k: Array(np.full_like(v.numpy(), np.inf)) for k, v in arrays.items()})
            return arrays, metrics

    registry._REGISTRY["test-overflows-in-round-2"] = OverflowsInRound2
    try:
        run_dir = run_local(tiny_config(tiny_root, tmp_path, rounds=2,
                                        strategy={"name": "test-overflows-in-round-2"}))
    finally:
        del registry._REGISTRY["test-overflows-in-round-2"]
    rounds = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "round"}
    assert "model_kept" not in rounds[1]
    assert rounds[2]["model_kept"] == "the aggregate of the valid replies is not finite (NaN/inf)"
    # The model of round 1 is the final model, and the report names the kept round.
    assert load_checkpoint(run_dir / "checkpoint.safetensors").server_round == 2
    final = load_arrays(run_dir / "model.safetensors")
    assert all(np.isfinite(v).all() for v in final.values())
    html = (run_dir / "report.html").read_text()
    assert "global model kept: the aggregate of the valid replies is not finite" in html


def test_a_split_too_small_for_the_sites_is_refused_before_the_run_folder_exists(tiny_root, tiny_config, tmp_path):
    # An empty test split passed the checks, failed at every site, and left a run folder
    # that could be neither resumed nor started afresh.
    from medfed.simulation.run import _preflight
    from medfed.sites.profiles import SiteProfileError

    data = dict(np.load(tiny_root / "breastmnist.npz"))
    root = tmp_path / "data"
    root.mkdir()
    np.savez(root / "breastmnist.npz", **{**data, "test_images": data["test_images"][:0],
                                          "test_labels": data["test_labels"][:0]})
    cfg = tiny_config(root, tmp_path / "runs")
    with pytest.raises(SiteProfileError, match=r"^The test split cannot be dealt to the sites: "):
        _preflight(cfg)
    assert not (tmp_path / "runs").exists()
    # A deployed server needs no data: the sites bring their own.
    _preflight(tiny_config(None, tmp_path / "runs", data={"dataset": "pneumoniamnist", "root": None, "img_size": 28}),
               simulated=False)
