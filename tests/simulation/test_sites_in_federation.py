"""Site profiles in a whole (in-process) federation: patient groups that differ between
sites, a held-out site, pooled-test figures (LocalGrid, no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medfed.server.metrics_log import load_run_metrics
from medfed.simulation.local import run_local


@pytest.fixture(scope="module")
def sites_run(tiny_root, tiny_config, tmp_path_factory) -> Path:
    # Site 0 holds only group 0, site 1 only group 1, site 2 both; a fourth, held-out site.
    federation = {
        "num_sites": 3, "partition": "iid", "pooled_test_metrics": True,  # off by default (privacy)
        "groups": ["female", {"name": "male", "corruptions": [["contrast_down", 2]]}],
        "sites": [
            {"group_mix": [1, 0], "corruptions": [["gaussian_noise", 1]]},
            {"group_mix": [0, 1]},
            {"group_mix": [1, 1]},
            {"name": "unseen", "held_out": True, "corruptions": [["pixelate", 2]]},
        ],
    }
    cfg = tiny_config(tiny_root, tmp_path_factory.mktemp("sites"), rounds=1, federation=federation)
    return run_local(cfg)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sites_with_different_groups_complete_a_round_with_per_group_metrics(sites_run):
    # Execute
    run = load_run_metrics(sites_run)
    round_record = run.round_records[1]
    # Assert: training was aggregated (Flower accepted the replies' keys), and every site
    # reported every group's keys, NaN for the group it does not hold.
    assert round_record["train"], "no training aggregate: the replies were rejected"
    site_0 = run.site_record(1, "evaluate", "site-0")["metrics"]
    assert math.isnan(site_0["acc-group-1"]) and site_0["num-examples-group-1"] == 0 and site_0["num-examples-group-0"] > 0
    pooled = round_record["evaluate_pooled"]
    assert {"acc", "auc", "acc_group_0", "acc_group_1", "auc_group_0", "es_acc", "es_auc"} <= set(pooled)
    sizes = [run.site_record(1, "evaluate", s)["num_examples"] for s in ("site-0", "site-1", "site-2")]
    assert pooled["n_group_0"] + pooled["n_group_1"] == pooled["num_examples"] == sum(sizes)
    assert 0.0 <= pooled["es_acc"] <= pooled["acc"] <= 1.0
    # The strategy's aggregate weighs each group's metric by the sites' counts of that
    # group, so site-0's NaN for group 1 does not make it NaN.
    evaluate = round_record["evaluate"]
    assert math.isfinite(evaluate["acc-group-1"]) and 0.0 <= evaluate["es-acc"] <= evaluate["acc"]


def test_pooled_accuracy_is_the_accuracy_of_the_summed_confusion(sites_run):
    # Prepare: hand-sum the training sites' confusion matrices.
    run = load_run_metrics(sites_run)
    matrices = [run.site_record(1, "evaluate", s)["confusion"] for s in ("site-0", "site-1", "site-2")]
    total = [[sum(m[i][j] for m in matrices) for j in range(2)] for i in range(2)]
    # Execute
    pooled = run.round_records[1]["evaluate_pooled"]
    # Assert
    assert pooled["acc"] == pytest.approx((total[0][0] + total[1][1]) / sum(map(sum, total)))


def test_held_out_site_is_evaluated_and_never_trains(sites_run):
    # Execute
    records = _records(sites_run)
    trained = {r["site"] for r in records if r["event"] == "site" and r["phase"] == "train"}
    evaluated = {r["site"]: r for r in records if r["event"] == "site" and r["phase"] == "evaluate"}
    start = next(r for r in records if r["event"] == "start")
    round_record = next(r for r in records if r["event"] == "round")
    # Assert
    assert trained == {"site-0", "site-1", "site-2"}
    assert evaluated["unseen"]["held_out"] is True and evaluated["unseen"]["num_examples"] > 0
    assert start["held_out_sites"] == ["unseen"] and start["groups"] == ["female", "male"]
    assert round_record["held_out"]["acc"] == evaluated["unseen"]["metrics"]["acc"]
    training_sizes = sum(evaluated[s]["num_examples"] for s in trained)
    assert round_record["evaluate_pooled"]["num_examples"] == training_sizes  # the held-out site is not pooled


def test_report_shows_site_preview_pooled_held_out_and_group_figures(sites_run):
    # Execute
    html = (sites_run / "report.html").read_text()
    # Assert: registered figures that apply to this run, and the run directory's sites.png.
    for name in ("pooled_vs_mean", "held_out", "groups"):
        assert (sites_run / "figures" / f"{name}.png").is_file()
    assert (sites_run / "sites.png").is_file() and 'alt="sites"' in html
    assert "unseen (held out)" in html and "pooled" in html and "held-out mean" in html
    assert "Patient groups" in html and "ES-ACC" in html
