"""Aggregation maths on plain numbers and arrays (no Flower objects in the maths)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from flwr.app import MetricRecord, RecordDict

__all__ = ["nan_aware_weighted_mean", "aggregate_metrics_ignoring_nan"]


def nan_aware_weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean over the finite values only; NaN when none is finite.

    A site whose split holds a single class reports AUC = NaN (undefined); a plain
    weighted mean would turn the whole federation's AUC into NaN.

    >>> round(nan_aware_weighted_mean([0.8, float("nan"), 0.6], [1, 5, 3]), 6)
    0.65
    """
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if math.isfinite(v)]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return float("nan")
    return sum(v * w for v, w in pairs) / total


def aggregate_metrics_ignoring_nan(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Sample-weighted mean of every scalar metric over the replies, skipping NaN.

    Drop-in for Flower's ``aggregate_metricrecords`` (same signature). List-valued
    metrics (a confusion matrix) are summed element-wise: counts add up to the
    federation's pooled counts.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighting_metric_name]) for m in metrics]
    out = MetricRecord()
    for key in metrics[0]:
        if key == weighting_metric_name:
            continue
        values = [m[key] for m in metrics if key in m]
        if isinstance(values[0], list):
            out[key] = [sum(col) for col in zip(*values)]
        elif len(values) == len(weights):
            out[key] = nan_aware_weighted_mean([float(v) for v in values], weights)
    return out
