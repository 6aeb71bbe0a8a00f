"""Tests for medfed.server.metrics_log: writing metrics.jsonl as standard JSON and reading it back."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from medfed.server.metrics_log import MetricsLog, MetricsLogError, load_run_metrics, read_metrics


def _strict_json(line: str) -> object:
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse and R's jsonlite do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


# ---------------------------------------------------------------------------- writing


def test_metrics_log_writes_one_json_line_per_record(tmp_path: Path) -> None:
    # Prepare
    log = MetricsLog(tmp_path / "metrics.jsonl")

    # Execute
    confusion = np.eye(2, dtype=np.int64)
    log.write({"event": "round", "round": np.int64(1), "acc": np.float32(0.5), "confusion": confusion})
    log.write({"event": "end", "rounds_done": 1})

    # Assert
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"event": "round", "round": 1, "acc": 0.5, "confusion": [[1, 0], [0, 1]]},
        {"event": "end", "rounds_done": 1},
    ]


def test_metrics_log_drops_partial_last_line_on_open(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start"}\n{"event": "ro')

    # Execute
    from medfed.errors import MedfedWarning

    with pytest.warns(MedfedWarning, match="Dropped a partially written last line"):  # one line in the CLI
        log = MetricsLog(path)
    log.write({"event": "end"})

    # Assert
    assert path.read_text() == '{"event": "start"}\n{"event": "end"}\n'


def test_metrics_log_keeps_complete_last_line_without_newline(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start"}')

    # Execute
    MetricsLog(path).write({"event": "end"})

    # Assert
    assert path.read_text() == '{"event": "start"}\n{"event": "end"}\n'



def test_undefined_and_diverged_metrics_are_written_as_null_and_read_back_as_nan(tmp_path: Path) -> None:
    # Prepare: an AUC undefined on a one-class split, and a diverged site's loss.
    log = MetricsLog(tmp_path / "metrics.jsonl")

    # Execute
    log.write({"event": "site", "round": 1, "phase": "evaluate", "site": "site-0", "num_examples": 3,
               "metrics": {"acc": 1.0, "auc": float("nan"), "loss": np.float32("inf")}})
    log.write({"event": "round", "round": 1, "wall_time_s": 2.0, "train": {"loss": -math.inf},
               "evaluate": {"acc": 1.0, "auc": np.float64("nan")}})

    # Assert: every line is standard JSON, with null where the value is not a finite number ...
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    site, round_ = (_strict_json(line) for line in lines)
    assert site["metrics"] == {"acc": 1.0, "auc": None, "loss": None}
    assert round_["train"] == {"loss": None} and round_["evaluate"] == {"acc": 1.0, "auc": None}
    # ... and the reader gives the report NaN back, where it computes with it.
    run = load_run_metrics(tmp_path)
    metrics = run.site_record(1, "evaluate", "site-0")["metrics"]
    assert metrics["acc"] == 1.0 and math.isnan(metrics["auc"]) and math.isnan(metrics["loss"])
    assert math.isnan(run.aggregate(1, "train")["loss"]) and math.isnan(run.aggregate(1, "evaluate")["auc"])
    assert run.round_records[1]["wall_time_s"] == 2.0


def test_a_log_written_with_nan_before_still_reads(tmp_path: Path) -> None:
    # Prepare: what medfed wrote before it wrote standard JSON.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "site", "round": 1, "phase": "evaluate", "site": "a", "metrics": {"auc": NaN}}\n')

    # Execute
    records = read_metrics(path)

    # Assert
    assert math.isnan(records[0]["metrics"]["auc"])


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    ("line", "match"),
    [("[1, 2]", "expected a JSON object with an 'event' key"),
     ('{"round": 1}', "expected a JSON object with an 'event' key"),
     ('{"event": "site", "round": 1, "phase": "train"}', "a 'site' record needs the key 'site'")],
)
def test_invalid_record_names_line(tmp_path: Path, line: str, match: str) -> None:
    # Prepare
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "start"}) + "\n" + line + "\n" + json.dumps({"event": "end"}) + "\n")

    # Execute / Assert
    with pytest.raises(MetricsLogError, match=rf"line 2: {re.escape(match)}"):
        read_metrics(path)


