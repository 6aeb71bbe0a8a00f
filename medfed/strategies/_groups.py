"""Per-group sample counts in MetricRecords: the one place their key format lives.

Every site's reply carries ``num-examples-group-<g>`` for each declared group (written
by the ClientApp). FairLoRA's server averages each group's singular values by those
counts across sites, and every MedfedStrategy weighs per-group metrics by them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfed.data.metrics import equity_scaled

__all__ = ["GROUP_COUNT_PREFIX", "equity_scaled_metrics", "group_count_metrics", "read_group_counts"]

GROUP_COUNT_PREFIX = "num-examples-group-"


def group_count_metrics(groups: Any, num_groups: int) -> dict[str, int]:
    """``{"num-examples-group-<g>": count}`` for ``g`` in ``0 .. num_groups - 1``.

    Parameters
    ----------
    groups : array-like or None
        Group id per sample ``[N]``; ids < 0 (unknown) are not counted. None: no groups.
    num_groups : int
        ``G``.
    """
    ids = np.asarray([] if groups is None else groups).reshape(-1).astype(np.int64)
    counts = np.bincount(ids[(ids >= 0) & (ids < num_groups)], minlength=num_groups)
    return {f"{GROUP_COUNT_PREFIX}{g}": int(counts[g]) for g in range(num_groups)}


def read_group_counts(metrics: Mapping[str, Any], num_groups: int) -> np.ndarray:
    """The counts ``[G]`` a reply reported (0 for a group it did not report)."""
    return np.array([float(metrics.get(f"{GROUP_COUNT_PREFIX}{g}", 0)) for g in range(num_groups)])


def equity_scaled_metrics(
    overall: Mapping[str, Any], replies: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("acc", "auc")
) -> dict[str, float]:
    """Per-group metrics over the sites, weighted by group counts, and their ES versions.

    Parameters
    ----------
    overall : Mapping[str, Any]
        The aggregated evaluation metrics (``"acc"``, ``"auc"``).
    replies : Sequence[Mapping[str, Any]]
        Each site's evaluation MetricRecord, with ``<metric>-group-<g>`` and
        ``num-examples-group-<g>``; NaN metrics (a group a site lacks) are skipped.
    metrics : Sequence[str]
        Metric names.

    Returns
    -------
    dict[str, float]
        ``<metric>-group-<g>`` (``sum_k n_kg m_kg / sum_k n_kg``) and ``es-<metric>``
        (``equity_scaled(overall, per-group)``); ``{}`` when no site reports group counts.
    """
    groups = sorted({
        int(key[len(GROUP_COUNT_PREFIX):]) for reply in replies for key in reply
        if key.startswith(GROUP_COUNT_PREFIX) and key[len(GROUP_COUNT_PREFIX):].isdigit()
    })
    result: dict[str, float] = {}
    for metric in metrics:
        per_group = {}
        for g in groups:
            pairs = [
                (float(reply[f"{metric}-group-{g}"]), float(reply.get(f"{GROUP_COUNT_PREFIX}{g}", 0)))
                for reply in replies
                if f"{metric}-group-{g}" in reply and math.isfinite(float(reply[f"{metric}-group-{g}"]))
            ]
            total = sum(n for _, n in pairs)
            if total > 0:
                per_group[g] = sum(v * n for v, n in pairs) / total
                result[f"{metric}-group-{g}"] = per_group[g]
        if metric in overall and per_group:
            result[f"es-{metric}"] = equity_scaled(float(overall[metric]), per_group)
    return result
