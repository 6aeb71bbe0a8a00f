"""benchmarks/bench_simulate.py: the figures the README quotes, read from a real run."""

from __future__ import annotations

import json

from benchmarks import bench_simulate
from medfed.server.metrics_log import load_run_metrics


def test_a_recorded_run_gives_its_last_rounds_metrics_and_all_its_bytes(tiny_root, tmp_path, monkeypatch):
    # Prepare: keep the run folder to compare with what the script read from it.
    kept = tmp_path / "kept"
    monkeypatch.setattr(bench_simulate.tempfile, "TemporaryDirectory", lambda prefix: _Folder(kept))
    out = tmp_path / "simulate.json"
    overrides = [f"data.root={tiny_root}", "rounds=2", "federation.num_sites=2", "train.local_epochs=1",
                 "train.batch_size=8", "simulation.engine=inprocess", "name=bench"]
    # Execute
    assert bench_simulate.main(["--out", str(out), *[a for o in overrides for a in ("--set", o)]]) == 0
    # Assert
    record = json.loads(out.read_text())
    run = load_run_metrics(kept / "bench")
    assert record["last_round"] == 2 == record["rounds"]
    assert record["evaluate"] == run.aggregate(2, "evaluate") and 0 <= record["evaluate"]["acc"] <= 1
    per_round = [r["bytes_sent"] + r["bytes_received"] for r in run.round_records.values()]
    assert len(per_round) == 2 and record["bytes_exchanged"] == sum(per_round) > 0
    assert record["machine"]["cpu_cores"] and record["total_s"] > 0


class _Folder:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.path.mkdir()
        return str(self.path)

    def __exit__(self, *exc):
        return False
