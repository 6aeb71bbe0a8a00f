"""NaN-aware metric aggregation, by hand-computed values."""

import math

from flwr.app import MetricRecord, RecordDict

from medfed.strategies import create_strategy
from medfed.strategies._aggregation import aggregate_site_metrics, nan_aware_weighted_mean


def test_weighted_mean_skips_nan_values_and_their_weights():
    assert math.isclose(nan_aware_weighted_mean([0.8, float("nan"), 0.6], [1, 5, 3]), (0.8 + 1.8) / 4)
    assert math.isnan(nan_aware_weighted_mean([float("nan")], [2]))


def test_metric_records_average_scalars_and_sum_confusion_counts():
    # Prepare: two sites, the second with an undefined AUC
    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": 10, "acc": 0.5, "auc": 0.9, "confusion": [3, 2, 1, 4]})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 30, "acc": 0.9, "auc": float("nan"), "confusion": [0, 0, 3, 27]})}),
    ]
    # Execute
    out = aggregate_site_metrics(replies, "num-examples")
    # Assert
    assert math.isclose(out["acc"], (0.5 * 10 + 0.9 * 30) / 40)
    assert math.isclose(out["auc"], 0.9)
    assert out["confusion"] == [3, 2, 4, 31]
    assert "num-examples" not in out


def test_registry_installs_the_nan_aware_aggregation():
    strategy = create_strategy("fedavg", {}, num_sites=2, fraction_train=1.0, fraction_evaluate=1.0)
    assert strategy.evaluate_metrics_aggr_fn is aggregate_site_metrics
    assert strategy.train_metrics_aggr_fn is aggregate_site_metrics


def test_a_site_whose_accuracy_is_nan_makes_the_mean_nan_not_the_others_mean():
    # 4 images at ACC 0.75 and 100 whose model output NaN: "ACC 0.75" hid the broken site.
    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": 4, "acc": 0.75, "auc": 0.8, "acc-group-0": 0.5})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 100, "acc": float("nan"), "auc": float("nan"),
                                             "acc-group-0": float("nan")})}),
    ]
    out = aggregate_site_metrics(replies, "num-examples")
    assert math.isnan(out["acc"])
    assert out["auc"] == 0.8 and out["acc-group-0"] == 0.5  # undefined on a split: left out
