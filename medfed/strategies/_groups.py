"""Per-group sample counts in MetricRecords: the one place their key format lives.

FairLoRA's server averages each group's singular values by that group's sample
counts across sites, and weighs per-group metrics the same way; sites report the
counts as ``num-examples-group-<g>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["GROUP_COUNT_PREFIX", "group_count_metrics", "read_group_counts"]

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
