"""End to end through Flower's simulation engine (Ray): a 3-site, 2-round federation of
medvit_v2_nano on tiny generated data ends with exactly the weights of the in-process
engine; a run SIGKILLed after round 1 and resumed ends with exactly the weights of the
uninterrupted run. These are the slow tests (each launch pays Ray's start-up);
test_local.py covers the same logic without Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from medfed.config import save_config
from medfed.server.checkpoint import CheckpointError, load_arrays, load_checkpoint
from medfed.server.metrics_log import load_run_metrics
from medfed.simulation import simulate
from medfed.simulation.local import run_local

LAUNCH_TIMEOUT_S = 300


def resolved_records(run_dir: Path) -> dict:
    """Site and round records after resolving the resume (later records win), without timings."""
    run = load_run_metrics(run_dir)

    def untimed(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("time_s", "wall_time_s", "time")}

    return {
        "sites": {key: untimed(r) for key, r in run.site_records.items()},
        "rounds": {key: untimed(r) for key, r in run.round_records.items()},
    }


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_arrays(a), load_arrays(b)
    assert list(first) == list(second)
    assert [k for k in first if not np.array_equal(first[k], second[k])] == []


RAY = {"cpus_per_site": 1.0, "engine": "ray"}


@pytest.fixture(scope="module")
def engine_run(tiny_root, tiny_config, tmp_path_factory) -> Path:
    cfg = tiny_config(tiny_root, tmp_path_factory.mktemp("engine"), simulation=RAY)
    return simulate(cfg)


def test_engine_run_completes_and_matches_the_in_process_run(engine_run, tiny_root, tiny_config, tmp_path, metric_records):
    # Prepare: the same experiment without Ray.
    local = run_local(tiny_config(tiny_root, tmp_path))
    # Execute
    run = load_run_metrics(engine_run)
    # Assert
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors", "report.html"):
        assert (engine_run / name).is_file(), name
    assert run.rounds == [1, 2] and run.sites == ["site-0", "site-1", "site-2"]
    assert set(run.round_records[2]["evaluate"]) >= {"loss", "acc", "auc", "balanced_acc"}
    assert metric_records(engine_run) == metric_records(local)
    assert_same_weights(engine_run / "model.safetensors", local / "model.safetensors")


def test_simulate_with_the_inprocess_engine_gives_the_ray_engines_weights(engine_run, tiny_root, tiny_config, tmp_path, metric_records):
    # Prepare: the in-process engine, chosen through the config.
    cfg = tiny_config(tiny_root, tmp_path, simulation={"cpus_per_site": 1.0, "engine": "inprocess"})
    # Execute
    run_dir = simulate(cfg)
    # Assert
    assert run_dir == (tmp_path / cfg.name).resolve()
    assert metric_records(run_dir) == metric_records(engine_run)
    assert_same_weights(run_dir / "model.safetensors", engine_run / "model.safetensors")


def _wait_for_round_checkpoint(process: subprocess.Popen, checkpoint: Path, server_round: int) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"The run ended (exit {process.returncode}) before its round-{server_round} checkpoint")
        try:
            if load_checkpoint(checkpoint).server_round >= server_round:
                return
        except CheckpointError:
            pass  # not written yet
        time.sleep(0.02)
    pytest.fail(f"No round-{server_round} checkpoint after {LAUNCH_TIMEOUT_S} s")


def test_run_killed_after_round_1_resumes_to_the_uninterrupted_weights(engine_run, tiny_root, tiny_config, tmp_path,
                                                                       request):
    # Prepare: `medfed simulate` in its own process group, SIGKILLed (with its Ray
    # processes) as soon as round 1's checkpoint exists.
    cfg = tiny_config(tiny_root, tmp_path / "runs", simulation=RAY)
    save_config(cfg, tmp_path / "experiment.yaml")
    run_dir = tmp_path / "runs" / cfg.name
    # The process's temporary folder, to see what a killed run leaves there (short: Ray keeps
    # its sockets in it, and a socket's path may not exceed 107 bytes).
    scratch = Path(tempfile.mkdtemp(prefix="mf-"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "TMPDIR": str(scratch)}
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "medfed.cli", "simulate", "--config", str(tmp_path / "experiment.yaml")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            _wait_for_round_checkpoint(process, run_dir / "checkpoint.safetensors", 1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert load_checkpoint(run_dir / "checkpoint.safetensors").server_round == 1
    assert not (run_dir / "model.safetensors").exists()
    log = (tmp_path / "killed.log").read_text()
    assert "Started a local Ray instance" not in log and "FutureWarning" not in log  # Ray starts quietly
    assert [p.name for p in scratch.iterdir() if p.name.startswith("medfed")] == []  # all medfed wrote is in run_dir
    # Execute
    simulate(cfg, run_dir=run_dir, resume=True)
    # Assert
    assert_same_weights(run_dir / "model.safetensors", engine_run / "model.safetensors")
    assert resolved_records(run_dir) == resolved_records(engine_run)


def test_rounds_that_sample_draw_the_same_sites_on_both_engines(tiny_root, tiny_config, tmp_path, metric_records):
    # Prepare: half of 4 training sites train each round, half are evaluated, and a held-out
    # site. Flower samples node ids with Python's random; Ray's node ids change every run,
    # and in-process the sites reseed that same random.
    federation = {"num_sites": 4, "partition": "iid", "fraction_train": 0.5, "fraction_evaluate": 0.5,
                  "sites": [{}, {}, {}, {}, {"held_out": True, "name": "new"}]}
    runs = {}
    for engine in ("ray", "inprocess"):
        cfg = tiny_config(tiny_root, tmp_path / engine, rounds=3, federation=federation,
                          simulation={"cpus_per_site": 1.0, "engine": engine})
        # Execute
        runs[engine] = simulate(cfg)
    # Assert: the same sites drawn, the same weights; the default quorum is a majority of
    # the 2 sites drawn (a majority of all 4 failed every such run); the held-out site is
    # evaluated in every round, outside the sampled fraction.
    assert metric_records(runs["ray"]) == metric_records(runs["inprocess"])
    assert_same_weights(runs["ray"] / "model.safetensors", runs["inprocess"] / "model.safetensors")
    records = metric_records(runs["ray"])
    for server_round in (1, 2, 3):
        trained = [r["site"] for r in records if r.get("phase") == "train" and r["round"] == server_round]
        evaluated = [r["site"] for r in records if r.get("phase") == "evaluate" and r["round"] == server_round]
        assert len(trained) == 2 and "new" not in trained
        assert "new" in evaluated and len(evaluated) == 3
    drawn = {tuple(sorted(r["site"] for r in records if r.get("phase") == "train" and r["round"] == n))
             for n in (1, 2, 3)}
    assert len(drawn) > 1  # a draw per round, not one fixed pair
