"""Aggregation maths on plain numbers and arrays (no Flower objects in the maths)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

# Not re-exported by flwr.serverapp.strategy; FedAvg's own weighted mean (flwr is pinned to 1.42.0).
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

__all__ = [
    "RUNNING_STATISTICS",
    "aggregate_site_metrics",
    "is_parameter",
    "mean_of_statistics",
    "nan_aware_weighted_mean",
]

#: State-dict suffixes of BatchNorm's running statistics: estimates of the features' mean
#: and variance, not weights (averaged, never stepped by a server optimiser).
RUNNING_STATISTICS = (".running_mean", ".running_var")


def is_parameter(name: str, dtype: Any) -> bool:
    """Whether an array is a trainable parameter: floating point and no BatchNorm running statistic.

    The others are BatchNorm's running mean and variance and integer or bool arrays
    (BatchNorm's ``num_batches_tracked`` counters).

    >>> is_parameter("bn.weight", "float32"), is_parameter("bn.running_var", "float32")
    (True, False)
    >>> is_parameter("bn.num_batches_tracked", np.int64)
    False
    """
    return np.issubdtype(np.dtype(dtype), np.floating) and not name.endswith(RUNNING_STATISTICS)


def mean_of_statistics(contents: Sequence[RecordDict], weighted_by_key: str | None) -> dict[str, np.ndarray]:
    """Mean over the replies of every array that is no parameter (:func:`is_parameter`).

    Parameters
    ----------
    contents : Sequence[RecordDict]
        Checked replies, each with one ArrayRecord and one MetricRecord.
    weighted_by_key : str or None
        Weight each reply by this metric (its example count), exactly as FedAvg does
        (Flower's ``aggregate_arrayrecords``); None: the plain mean, computed in float64.

    Returns
    -------
    dict[str, np.ndarray]
        Name -> mean, for the names of the first reply's ArrayRecord that are running
        statistics or integer/bool arrays; integer means are not rounded (floating
        point, as FedAvg leaves them). ``{}`` without replies or such arrays.
    """
    records = [next(iter(content.array_records.values())) for content in contents]
    if not records:
        return {}
    names = [name for name, array in records[0].items() if not is_parameter(name, array.dtype)]
    if not names:
        return {}
    if weighted_by_key is None:
        return {
            name: np.mean(np.stack([record[name].numpy() for record in records]), axis=0, dtype=np.float64)
            for name in names
        }
    subsets = [
        RecordDict({
            "arrays": ArrayRecord({name: record[name] for name in names}),
            "metrics": MetricRecord(
                {weighted_by_key: next(iter(content.metric_records.values()))[weighted_by_key]}
            ),
        })
        for content, record in zip(contents, records, strict=True)
    ]
    return {name: array.numpy() for name, array in aggregate_arrayrecords(subsets, weighted_by_key).items()}


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


def _may_be_undefined(key: str) -> bool:
    """Whether a site's NaN under ``key`` means "undefined here" rather than "broken": AUC
    on a one-class split, and per-group metrics (a group the site lacks)."""
    return key == "auc" or "-group-" in key


def sites_mean(key: str, values: Sequence[float], weights: Sequence[float]) -> float:
    """The weighted mean of the sites' ``values`` of metric ``key``: a NaN AUC or per-group
    metric (undefined on a site's split) is left out; any other NaN makes the mean NaN."""
    if _may_be_undefined(key):
        return nan_aware_weighted_mean(values, weights)
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total > 0 else float("nan")


def aggregate_site_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Sample-weighted mean of every scalar metric over the replies, skipping a NaN AUC.

    Drop-in for Flower's ``aggregate_metricrecords`` (same signature). A site's NaN
    ``auc`` or per-group metric (undefined on its split) is left out of that mean
    (:func:`nan_aware_weighted_mean`); any other NaN (a site whose model outputs NaN
    has ACC NaN) makes the mean NaN: leaving the site out would report the others' ACC
    as the federation's. List-valued metrics (a confusion matrix) are summed
    element-wise: counts add up to the federation's pooled counts.
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
            out[key] = sites_mean(key, [float(v) for v in values], weights)
    return out
