"""benchmarks/bench_strategies.py's numbers of one run, read from its metrics.jsonl."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.bench_strategies import _fmt, run_metrics


@pytest.mark.parametrize("diverged", ["site-0", "site-1"])
def test_a_site_with_a_nan_accuracy_is_the_worst_site_wherever_it_stands(tmp_path, diverged):
    # Prepare: one site diverged (ACC NaN), the other did not.
    accs = {"site-0": 0.5, "site-1": 0.5, diverged: math.nan}
    records = [{"event": "start", "resumed_from_round": 0, "num_rounds": 1}]
    records += [{"event": "site", "round": 1, "phase": "evaluate", "site": site, "num_examples": 10,
                 "metrics": {"acc": acc}} for site, acc in accs.items()]
    records.append({"event": "round", "round": 1, "wall_time_s": 1.0, "bytes_sent": 10, "bytes_received": 20,
                    "train": {}, "evaluate": {"acc": 0.5, "es-auc": 0.7}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Execute
    numbers = run_metrics(tmp_path)
    # Assert
    assert math.isnan(numbers["worst_site_acc"])
    assert numbers["es_auc"] == 0.7 and numbers["bytes_per_round"] == 30


def test_the_table_names_the_seeds_whose_value_is_nan():
    assert _fmt([math.nan, 0.6, 0.7], "worst_site_acc") == "0.650 ± 0.071 (1 of 3 NaN)"
    assert _fmt([0.6, 0.7], "acc") == "0.650 ± 0.071"
    assert _fmt([None, None], "held_out_acc") == "-"


def test_a_final_round_without_evaluation_takes_the_last_evaluated_round(tmp_path):
    records = [{"event": "start", "resumed_from_round": 0, "num_rounds": 2}]
    for r, acc in ((1, 0.65), (2, None)):
        records += [{"event": "site", "round": r, "phase": "evaluate", "site": "site-0", "num_examples": 10,
                     "metrics": {"acc": acc}}] if acc is not None else []
        records.append({"event": "round", "round": r, "wall_time_s": 1.0, "bytes_sent": 10, "bytes_received": 20,
                        "train": {}, "evaluate": {"acc": acc} if acc is not None else {}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    numbers = run_metrics(tmp_path)
    assert numbers["acc"] == 0.65 and numbers["worst_site_acc"] == 0.65
