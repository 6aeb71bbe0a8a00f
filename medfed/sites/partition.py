"""Split one dataset among simulated sites: IID or Dirichlet label skew.

Pure NumPy, seeded and deterministic: the same labels, number of sites and seed give
the same split in every process, so each simulated site can rebuild its own share
without anything travelling. This module imports neither Flower nor torch, so that the
ClientApp may use it to find its partition (see :mod:`medfed.client.site_data`).

The Dirichlet split follows Hsu, Qi and Brown, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification" (arXiv:1909.06335): for every
class ``c`` a share vector ``p_c ~ Dir(alpha * 1_S)`` over the ``S`` sites says which
fraction of that class each site receives; smaller ``alpha`` means more skew. The
per-class shares are returned by :func:`dirichlet_proportions` so that a site's test
split can be drawn with the same shares as its training split.
"""

from __future__ import annotations

import heapq

import numpy as np

from medfed.errors import MedfedError

__all__ = [
    "PARTITIONERS",
    "PartitionError",
    "dirichlet_partition",
    "dirichlet_proportions",
    "expected_sizes",
    "iid_partition",
    "partition_labels",
    "split_by_proportions",
]

#: Names accepted by :func:`partition_labels` (the config's ``federation.partition``).
PARTITIONERS = ("iid", "dirichlet")

# A Dirichlet draw may leave a site without samples; draw again this many times with
# the next seeds before moving samples to the empty sites (_fill_empty_sites).
_MAX_REDRAWS = 10


class PartitionError(MedfedError):
    """A partition cannot be made with the given labels and parameters."""


def _check_num_sites(num_sites: object, num_samples: int, caller: str) -> int:
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise PartitionError(
            f"The 'num_sites' parameter of {caller} must be an int >= 1. Got {num_sites!r} instead."
        )
    if num_samples < num_sites:
        raise PartitionError(
            f"{caller} cannot give each of {num_sites} sites at least one sample: the split holds only "
            f"{num_samples}; use fewer sites or more data."
        )
    return int(num_sites)


def _check_labels(labels: np.ndarray, caller: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise PartitionError(
            f"{caller} needs one class index >= 0 per sample (an int array [N]). Got {labels.dtype} "
            f"{tuple(labels.shape)} instead; multi-label data can only be split with partition 'iid'."
        )
    return labels.astype(np.int64, copy=False)


def _check_alpha(alpha: object, caller: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) or not (
        np.isfinite(alpha) and alpha > 0
    ):
        raise PartitionError(
            f"The 'alpha' parameter of {caller} must be a float in the range (0, inf). Got {alpha!r} instead."
        )
    return float(alpha)


def iid_partition(num_samples: int, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle the sample indices and cut them into ``num_sites`` near-equal parts.

    Parameters
    ----------
    num_samples : int
        Number of samples ``N`` in the split.
    num_sites : int
        Number of sites ``S``, ``1 <= S <= N``.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    list[np.ndarray]
        ``S`` sorted ``int64`` index arrays; sizes differ by at most one and together
        they hold every index in ``[0, N)`` exactly once.
    """
    num_sites = _check_num_sites(num_sites, num_samples, "iid_partition")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_sites)]


def dirichlet_proportions(num_classes: int, num_sites: int, alpha: float, seed: int) -> np.ndarray:
    """Draw each class's shares over the sites from ``Dir(alpha)``.

    Returns
    -------
    np.ndarray
        ``float64`` ``[num_classes, num_sites]``; every row sums to 1.
    """
    alpha = _check_alpha(alpha, "dirichlet_proportions")
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(num_sites, alpha), size=num_classes)


def split_by_proportions(labels: np.ndarray, proportions: np.ndarray, seed: int) -> list[np.ndarray]:
    """Deal every class's samples to the sites in the given shares.

    Within class ``c`` (``n_c`` samples, shuffled), site ``s`` receives the slice
    between the rounded cumulative shares ``round(n_c * cumsum(p_c))``.

    Parameters
    ----------
    labels : np.ndarray
        Class index per sample, ``int`` ``[N]``.
    proportions : np.ndarray
        ``[C, S]`` shares, rows summing to 1, with ``C > labels.max()``.
    seed : int
        Seed of the within-class shuffles.

    Returns
    -------
    list[np.ndarray]
        ``S`` sorted ``int64`` index arrays (some may be empty) that together hold every
        index exactly once.
    """
    labels = _check_labels(labels, "split_by_proportions")
    proportions = np.asarray(proportions, dtype=np.float64)
    num_classes, num_sites = proportions.shape
    if labels.size and labels.max() >= num_classes:
        raise PartitionError(
            f"split_by_proportions got labels up to {labels.max()} but shares for {num_classes} classes; "
            "pass one row of shares per class."
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.rint(np.cumsum(proportions[c]) * members.size).astype(np.int64)
        bounds[-1] = members.size  # rounding must not drop the last sample
        for site, piece in enumerate(np.split(members, bounds[:-1])):
            parts[site].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int, *, num_classes: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Label-skewed split where every site receives at least one sample.

    Shares are drawn with seeds ``seed, seed + 1, ...`` until no site is empty (at most
    ``_MAX_REDRAWS`` draws); if sites are still empty after that (tiny data, tiny
    ``alpha``), each empty site takes one sample from the site that holds the most for
    its share (see :func:`_fill_empty_sites`).

    Parameters
    ----------
    labels : np.ndarray
        Class index per sample, ``int`` ``[N]``.
    num_sites : int
        Number of sites ``S``, ``1 <= S <= N``.
    alpha : float
        Dirichlet concentration, > 0.
    seed : int
        Seed of the shares and of the within-class shuffles.
    num_classes : int, optional
        Number of classes ``C`` (default ``labels.max() + 1``).

    Returns
    -------
    parts : list[np.ndarray]
        ``S`` non-empty sorted ``int64`` index arrays covering every index once.
    proportions : np.ndarray
        The ``[C, S]`` shares used, to split another split (e.g. test) alike.
    """
    labels = _check_labels(labels, "dirichlet_partition")
    num_sites = _check_num_sites(num_sites, labels.size, "dirichlet_partition")
    alpha = _check_alpha(alpha, "dirichlet_partition")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    for attempt in range(_MAX_REDRAWS):
        proportions = dirichlet_proportions(num_classes, num_sites, alpha, seed + attempt)
        parts = split_by_proportions(labels, proportions, seed + attempt)
        if all(part.size for part in parts):
            return parts, proportions
    return _fill_empty_sites(parts, expected_sizes(labels, proportions)), proportions


def expected_sizes(labels: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """The samples each site's shares give it before rounding: ``sum_c n_c * p[c, s]``.

    Parameters
    ----------
    labels : np.ndarray
        Class index per sample, ``int`` ``[N]``.
    proportions : np.ndarray
        ``[C, S]`` shares with ``C > labels.max()``.

    Returns
    -------
    np.ndarray
        ``float64`` ``[S]``, summing to ``N``. Summed class by class, so every process
        gets the same bits (a matrix product's order depends on the BLAS build).
    """
    labels = np.asarray(labels).reshape(-1)
    proportions = np.asarray(proportions, dtype=np.float64)
    counts = np.bincount(labels, minlength=proportions.shape[0]) if labels.size else np.zeros(proportions.shape[0], int)
    sizes = np.zeros(proportions.shape[1], dtype=np.float64)
    for count, shares in zip(counts, proportions):
        sizes += count * shares
    return sizes


def _fill_empty_sites(parts: list[np.ndarray], intended: np.ndarray) -> list[np.ndarray]:
    """Give each empty site one sample, from the site that holds the most for its intended size.

    Empty sites are filled in order; each takes the last index of the donor whose size
    over its intended size (``intended[s]``: what its shares give it before rounding,
    :func:`expected_sizes`) is the largest among the sites holding two samples or more;
    ties go to the larger site, then the lower index. Donors so keep about the same
    fraction of their intended size: taking every sample from the largest site drained it
    (150 sites under ``quantity_skew {power_law: 3}`` left site 0 two of its ~130 test
    images). Parts with no empty site come back unchanged (as copies). A site stays empty
    only when no site holds two samples (fewer samples than sites).
    """
    parts = [part.copy() for part in parts]
    empty = [site for site, part in enumerate(parts) if part.size == 0]
    if not empty:
        return parts
    intended = np.asarray(intended, dtype=np.float64)

    def key(site: int) -> tuple[float, int, int]:  # smallest first: the most over-served, larger, lower index
        size = parts[site].size
        return (-(size / intended[site]) if intended[site] > 0 else -np.inf, -size, site)

    donors = [key(site) for site, part in enumerate(parts) if part.size >= 2]
    heapq.heapify(donors)
    for site in empty:
        if not donors:
            break
        donor = heapq.heappop(donors)[2]
        parts[site] = parts[donor][-1:]
        parts[donor] = parts[donor][:-1]
        if parts[donor].size >= 2:
            heapq.heappush(donors, key(donor))
    return parts


def partition_labels(
    labels: np.ndarray,
    num_sites: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    num_classes: int | None = None,
    proportions: np.ndarray | None = None,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Split sample indices among sites with the named method.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` class indices (``[N, L]`` multi-label is accepted for ``"iid"`` only).
    num_sites : int
        Number of sites.
    method : {"iid", "dirichlet"}
        Partitioner name.
    alpha : float
        Dirichlet concentration (``"dirichlet"`` only).
    seed : int
        Seed of every random draw.
    num_classes : int, optional
        Number of classes, for the shares' shape.
    proportions : np.ndarray, optional
        ``[C, S]`` shares from an earlier call (``"dirichlet"`` only): reuse them, e.g.
        to split a site's test samples like its training samples. Sites may then be
        empty when the split is small; each is filled as :func:`_fill_empty_sites` says.

    Returns
    -------
    parts : list[np.ndarray]
        ``num_sites`` non-empty sorted index arrays.
    proportions : np.ndarray or None
        The shares used (None for ``"iid"``).
    """
    labels = np.asarray(labels)
    if method == "iid":
        return iid_partition(labels.shape[0], num_sites, seed), None
    if method == "dirichlet":
        if proportions is None:
            return dirichlet_partition(labels, num_sites, alpha, seed, num_classes=num_classes)
        labels = _check_labels(labels, "partition_labels")
        _check_num_sites(num_sites, labels.size, "partition_labels")
        proportions = np.asarray(proportions, dtype=np.float64)
        if proportions.ndim != 2 or proportions.shape[1] != num_sites:
            raise PartitionError(
                f"The 'proportions' parameter of partition_labels must have shape [C, {num_sites}]. "
                f"Got {tuple(proportions.shape)} instead."
            )
        parts = split_by_proportions(labels, proportions, seed)
        return _fill_empty_sites(parts, expected_sizes(labels, proportions)), proportions
    raise PartitionError(
        f"The 'method' parameter of partition_labels must be a str among {set(PARTITIONERS)}. Got {method!r} instead."
    )
