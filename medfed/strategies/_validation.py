"""Checks that decide whether a site's training reply may enter the aggregate.

One diverged site (NaN/inf weights) turns a weighted average into NaN, and one reply
with other array names or shapes cannot be averaged at all. These functions find such
replies so that a strategy can drop them and aggregate the rest. The array checks are
pure NumPy; :func:`find_invalid_replies` applies them to Flower ``RecordDict`` replies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from medfed.transfer import numpy_arrays

from ._aggregation import is_parameter

__all__ = [
    "array_layout",
    "clip_update",
    "count_non_finite",
    "describe_layout_mismatch",
    "find_invalid_evaluate_replies",
    "find_invalid_replies",
    "find_norm_outliers",
    "update_norm",
]

T = TypeVar("T")

#: Layout of a set of named arrays: ``((name, shape), ...)`` sorted by name.
Layout = tuple[tuple[str, tuple[int, ...]], ...]


def count_non_finite(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Count NaN and +-inf entries per array.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        Named arrays of any shape and dtype; integer and bool arrays are always finite.

    Returns
    -------
    dict[str, int]
        Number of non-finite entries for each array that has any, in input order;
        empty when every entry is finite.
    """
    counts: dict[str, int] = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.inexact):
            continue
        finite = np.isfinite(array)
        if not finite.all():
            counts[name] = int(finite.size - np.count_nonzero(finite))
    return counts


def array_layout(shapes: Mapping[str, Sequence[int]]) -> Layout:
    """Names and shapes of a set of arrays, as a hashable, order-free value.

    Parameters
    ----------
    shapes : Mapping[str, Sequence[int]]
        Array name -> shape.

    Returns
    -------
    Layout
        ``((name, shape), ...)`` sorted by name.
    """
    return tuple(sorted((name, tuple(int(n) for n in shape)) for name, shape in shapes.items()))


def describe_layout_mismatch(layout: Layout, expected: Layout) -> str:
    """Say how ``layout`` differs from ``expected`` in one short phrase."""
    shapes, expected_shapes = dict(layout), dict(expected)
    missing = [name for name in expected_shapes if name not in shapes]
    extra = [name for name in shapes if name not in expected_shapes]
    parts = []
    if missing:
        parts.append(f"missing arrays {_short_list(missing)}")
    if extra:
        parts.append(f"unexpected arrays {_short_list(extra)}")
    for name, shape in shapes.items():
        if name in expected_shapes and shape != expected_shapes[name]:
            parts.append(f"array {name!r} has shape {shape}, expected {expected_shapes[name]}")
            break
    return "; ".join(parts)


def _short_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _array_problem(record: ArrayRecord) -> str | None:
    """What makes a reply's arrays unusable, in a short phrase: bytes that do not read as
    their arrays, an array of another shape than it declares, NaN/inf values; else None."""
    try:
        arrays = numpy_arrays(record)
    except (ValueError, TypeError, EOFError, OverflowError) as error:  # what np.load raises on bad bytes
        return f"arrays that cannot be read ({type(error).__name__})"
    for name, values in arrays.items():
        if values.shape != tuple(record[name].shape):
            return f"array {name!r} holds another shape than it declares"
    counts = count_non_finite(arrays)
    if not counts:
        return None
    name, count = next(iter(counts.items()))
    more = len(counts) - 1
    others = f" (and {more} more array{'s' if more > 1 else ''})" if more else ""
    return f"array {name!r} holds {count} NaN/inf {'value' if count == 1 else 'values'}{others}"


def find_invalid_replies(
    contents: Sequence[RecordDict],
    weighted_by_key: str = "num-examples",
    reference: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    *,
    whole: bool = False,
) -> dict[int, str]:
    """Find training replies that must not enter a weighted average.

    A reply is invalid when it does not carry exactly one ArrayRecord and one
    MetricRecord, when its weight (``weighted_by_key`` in the MetricRecord) is not a
    finite number > 0, a per-group count (``<weighted_by_key>-group-*``) is not a
    finite number >= 0 or the counts add up to more than the weight, when any of its arrays holds NaN or inf, when an array is not
    one of ``reference``'s (the global model's) or has another shape or dtype there, when
    its array names, shapes or dtypes differ from those of most valid replies, or when
    its metric names differ from most valid replies'. A tie goes to the layout with the
    most arrays, or the most metric names (the other reply lacks some: with two sites a
    reply that lost an array or a metric must not outvote the whole one), then to the
    reply that came first. Checks run in that order, so a reply that fails one does not
    vote in the next.

    Parameters
    ----------
    contents : Sequence[RecordDict]
        Contents of the replies that carry no error.
    weighted_by_key : str
        MetricRecord key holding the reply's weight (its number of examples).
    reference : Mapping[str, tuple[tuple[int, ...], str]], optional
        Name -> (shape, dtype) of the global arrays the sites started from. A site may
        send a subset of them (FedBN keeps its BatchNorm), never an array they lack: with
        only two replies the majority cannot tell a broken reply from a good one, the
        global model can.
    whole : bool
        Every site sends all of ``reference``'s arrays (its client hooks send the whole
        model): a reply that lacks some is invalid, even when most replies lack them
        (Flower's FedOpt stops the run on such an aggregate).

    Returns
    -------
    dict[int, str]
        Index into ``contents`` -> reason, for each invalid reply; empty if all are
        valid. Reasons are short phrases such as ``"array 'w' holds 2 NaN/inf values"``.
    """
    invalid: dict[int, str] = {}
    layouts: dict[int, tuple[str, Layout, tuple]] = {}
    for index, content in enumerate(contents):
        reason = _structure_problem(content, weighted_by_key)
        if reason is None:
            record_name, record = next(iter(content.array_records.items()))
            reason = _array_problem(record)
            if reason is None and reference is not None:
                reason = _misfit(record, reference, whole=whole)
            if reason is None:
                layouts[index] = (
                    record_name,
                    array_layout({name: array.shape for name, array in record.items()}),
                    tuple(sorted((name, array.dtype) for name, array in record.items())),
                )
        if reason is not None:
            invalid[index] = reason

    if layouts:
        expected_name, expected, expected_dtypes = _majority(layouts.values(), size=lambda layout: len(layout[2]))
        for index, (record_name, layout, dtypes) in layouts.items():
            if record_name != expected_name:
                invalid[index] = (
                    f"its ArrayRecord is named {record_name!r}, the others' {expected_name!r}"
                )
            elif layout != expected:
                invalid[index] = (
                    "its arrays differ from the other replies': "
                    + describe_layout_mismatch(layout, expected)
                )
            elif dtypes != expected_dtypes:
                name, dtype, wanted = next(
                    (n, d, w) for (n, d), (_, w) in zip(dtypes, expected_dtypes) if d != w
                )
                invalid[index] = (
                    f"its arrays differ from the other replies': array {name!r} has dtype "
                    f"{dtype}, expected {wanted}"
                )
    kept = {index: contents[index] for index in range(len(contents)) if index not in invalid}
    invalid.update(_metric_key_mismatches(kept))
    return dict(sorted(invalid.items()))


def find_invalid_evaluate_replies(
    contents: Sequence[RecordDict], weighted_by_key: str = "num-examples"
) -> dict[int, str]:
    """Find evaluation replies that cannot be averaged with the others.

    Flower's metric aggregation raises on the first reply whose metric names differ from
    the others', ending the run; such a reply, one without exactly one MetricRecord, or
    one whose weight or per-group counts are not finite (weight > 0, counts >= 0), or
    whose counts add up to more than its weight, is reported here instead.

    Parameters
    ----------
    contents : Sequence[RecordDict]
        Contents of the replies that carry no error.
    weighted_by_key : str
        MetricRecord key holding the reply's weight (its number of test examples).

    Returns
    -------
    dict[int, str]
        Index into ``contents`` -> reason; empty if all are valid.
    """
    invalid = {}
    for index, content in enumerate(contents):
        reason = _metrics_problem(content, weighted_by_key)
        if reason is not None:
            invalid[index] = reason
    kept = {index: contents[index] for index in range(len(contents)) if index not in invalid}
    invalid.update(_metric_key_mismatches(kept))
    return dict(sorted(invalid.items()))


def _misfit(record: Mapping, reference: Mapping[str, tuple[tuple[int, ...], str]], *, whole: bool = False) -> str | None:
    """Why ``record`` does not fit the global arrays, or None."""
    extra = [name for name in record if name not in reference]
    if extra:
        return f"its arrays are not the global model's: unexpected arrays {_short_list(extra)}"
    missing = [name for name in reference if name not in record] if whole else []
    if missing:
        return f"its arrays are not the whole global model: it lacks {_short_list(missing)}"
    for name, array in record.items():
        shape, dtype = reference[name]
        if tuple(array.shape) != tuple(shape):
            return f"array {name!r} has shape {tuple(array.shape)}, the global model's {tuple(shape)}"
        if array.dtype != dtype:
            return f"array {name!r} has dtype {array.dtype}, the global model's {dtype}"
    return None


def _metric_key_mismatches(contents: Mapping[int, RecordDict]) -> dict[int, str]:
    """Replies whose metric names differ from most replies' (ties: the most names, then the first reply's)."""
    keys = {index: frozenset(next(iter(c.metric_records.values())).keys()) for index, c in contents.items()}
    if not keys:
        return {}
    expected = _majority(keys.values(), size=len)
    mismatches = {}
    for index, names in keys.items():
        if names != expected:
            parts = []
            if expected - names:
                parts.append(f"missing {_short_list(sorted(expected - names))}")
            if names - expected:
                parts.append(f"unexpected {_short_list(sorted(names - expected))}")
            mismatches[index] = "its metrics differ from the other replies': " + "; ".join(parts)
    return mismatches


def _majority(values: Iterable[T], size: Callable[[T], int]) -> T:
    """The most common of ``values``; among equally common ones the largest by ``size``, then the first."""
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], size(value)))  # max keeps the first of equals


def _structure_problem(content: RecordDict, weighted_by_key: str) -> str | None:
    num_arrays = len(content.array_records)
    if num_arrays != 1:
        return f"it carries {num_arrays} ArrayRecords, expected exactly 1"
    return _metrics_problem(content, weighted_by_key)


def _metrics_problem(content: RecordDict, weighted_by_key: str) -> str | None:
    num_metrics = len(content.metric_records)
    if num_metrics != 1:
        return f"it carries {num_metrics} MetricRecords, expected exactly 1"
    metrics = next(iter(content.metric_records.values()))
    if weighted_by_key not in metrics:
        return f"its MetricRecord lacks the weight key {weighted_by_key!r}"
    weight = metrics[weighted_by_key]
    if not _is_finite_number(weight) or weight <= 0:
        return f"its weight {weighted_by_key!r} is {weight!r}, expected a finite number > 0"
    # Per-group counts weight FairLoRA's singular values and the per-group metrics: each
    # is a count of the reply's own examples (those of no known group are in none).
    group_total = 0.0
    for key, value in metrics.items():
        if key.startswith(f"{weighted_by_key}-group-"):
            if not _is_finite_number(value) or value < 0:
                return f"its group count {key!r} is {value!r}, expected a finite number >= 0"
            group_total += value
    if group_total > weight:
        return (f"its group counts add up to {group_total:g}, more than its {weighted_by_key!r} of {weight:g}")
    return None


def _is_finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - reference`` over the parameters both hold.

    BatchNorm's running statistics do not count: they follow the site's image
    intensities (another scanner), can move far more than the weights, and would make
    clipping shrink the weight update and the outlier check drop the heterogeneous
    sites. Integer arrays (BatchNorm counters) do not count either
    (:func:`~medfed.strategies._aggregation.is_parameter`).

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        A site's returned arrays.
    reference : Mapping[str, np.ndarray]
        The global arrays the site started from; names it lacks are skipped.

    Returns
    -------
    float
        ``sqrt(sum_k ||arrays[k] - reference[k]||^2)`` over the parameters ``k``,
        computed in float64.
    """
    total = 0.0
    for name, array in arrays.items():
        array = np.asarray(array)
        if name not in reference or not is_parameter(name, array.dtype):
            continue
        delta = array.astype(np.float64) - np.asarray(reference[name], dtype=np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


#: 1.4826 * MAD estimates the standard deviation of normally distributed values.
_MAD_TO_STD = 1.4826


def find_norm_outliers(norms: Sequence[float], max_z: float) -> dict[int, str]:
    """Updates whose norm lies far above the others', by a robust z-score.

    ``z_i = (norm_i - median) / scale`` with ``scale = max(1.4826 * MAD, 0.1 * median)``:
    median and MAD (median absolute deviation) are not moved by the outlier itself,
    and the floor at 10 % of the median keeps sites whose norms nearly agree (MAD
    ~ 0) from being flagged for tiny differences. Only norms *above* the median are
    flagged: a site that barely moved harms no average.

    Parameters
    ----------
    norms : Sequence[float]
        Update norm of each reply (:func:`update_norm`), all finite.
    max_z : float
        Threshold, > 0; e.g. 6 flags an update about 6 robust standard deviations
        above the median.

    Returns
    -------
    dict[int, str]
        Index -> reason for each outlier; empty with fewer than 3 norms (with two,
        no majority says which one is off).

    Examples
    --------
    >>> find_norm_outliers([1.0, 1.1, 0.9, 50.0], max_z=6)
    {3: 'its update norm 50 is 330.2 robust standard deviations above the median 1.05 (limit 6)'}
    """
    values = np.asarray(norms, dtype=np.float64)
    if values.size < 3:
        return {}
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    scale = max(_MAD_TO_STD * mad, 0.1 * median)
    if scale <= 0:  # every site sent back the global model unchanged
        return {}
    outliers = {}
    for index, norm in enumerate(values):
        z = (norm - median) / scale
        if z > max_z:
            outliers[index] = (
                f"its update norm {norm:.3g} is {z:.1f} robust standard deviations above the "
                f"median {median:.3g} (limit {max_z:g})"
            )
    return outliers


def clip_update(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float
) -> dict[str, np.ndarray]:
    """Scale the parameters' update ``arrays - reference`` down to norm ``max_norm`` (norm clipping).

    Only the parameters are measured (:func:`update_norm`) and scaled; BatchNorm's
    running statistics and integer arrays pass through unchanged.

    Parameters
    ----------
    arrays, reference : Mapping[str, np.ndarray]
        As for :func:`update_norm`.
    max_norm : float
        Largest update norm kept, > 0.

    Returns
    -------
    dict[str, np.ndarray]
        ``reference + delta * min(1, max_norm / ||delta||)`` for the parameters the
        reference holds, in their dtype; other arrays unchanged. ``arrays`` itself
        (same objects) when the update is already short enough.

    Examples
    --------
    >>> clipped = clip_update({"w": np.full(2, 4.0), "bn.running_var": np.full(2, 9.0)},
    ...                       {"w": np.zeros(2), "bn.running_var": np.ones(2)}, max_norm=np.sqrt(2))
    >>> clipped["w"], clipped["bn.running_var"]
    (array([1., 1.]), array([9., 9.]))
    """
    norm = update_norm(arrays, reference)
    if norm <= max_norm:
        return dict(arrays)
    factor = max_norm / norm
    clipped = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if name in reference and is_parameter(name, array.dtype):
            base = np.asarray(reference[name], dtype=np.float64)
            array = (base + (array.astype(np.float64) - base) * factor).astype(array.dtype)
        clipped[name] = array
    return clipped
