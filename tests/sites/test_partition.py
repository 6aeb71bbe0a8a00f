"""Partitioners (medfed.sites.partition): pure NumPy, seeded, every index once, every site non-empty."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.sites.partition import (
    PartitionError,
    dirichlet_partition,
    dirichlet_proportions,
    iid_partition,
    partition_labels,
    split_by_proportions,
)


def _assert_exact_cover(parts: list[np.ndarray], num_samples: int) -> None:
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(num_samples))


def test_iid_partition_sizes_differ_by_at_most_one_and_cover_every_index():
    # Prepare: 10 samples over 3 sites -> sizes 4, 3, 3 (np.array_split order).
    # Execute
    parts = iid_partition(10, 3, seed=0)
    # Assert
    assert [len(p) for p in parts] == [4, 3, 3]
    _assert_exact_cover(parts, 10)


def test_iid_partition_is_seeded():
    # Prepare / Execute
    first, again, other = iid_partition(50, 4, seed=7), iid_partition(50, 4, seed=7), iid_partition(50, 4, seed=8)
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_split_by_proportions_deals_each_class_by_its_rounded_shares():
    # Prepare: class 0 has 4 samples split 50/50, class 1 has 2 samples all to site 1.
    labels = np.array([0, 0, 0, 0, 1, 1])
    shares = np.array([[0.5, 0.5], [0.0, 1.0]])
    # Execute
    parts = split_by_proportions(labels, shares, seed=0)
    # Assert: site 0 holds two class-0 samples; site 1 two class-0 and both class-1 samples.
    assert np.bincount(labels[parts[0]], minlength=2).tolist() == [2, 0]
    assert np.bincount(labels[parts[1]], minlength=2).tolist() == [2, 2]
    _assert_exact_cover(parts, 6)


def test_dirichlet_partition_small_alpha_skews_labels_and_keeps_sites_non_empty():
    # Prepare: 3 balanced classes of 100 samples.
    labels = np.repeat(np.arange(3), 100)
    # Execute
    parts, shares = dirichlet_partition(labels, 4, alpha=0.1, seed=3)
    # Assert
    _assert_exact_cover(parts, 300)
    assert all(len(p) > 0 for p in parts)
    assert shares.shape == (3, 4)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    # With alpha = 0.1 most of each class lands on one site (IID would give 25 %).
    largest_share = max(np.bincount(labels[p], minlength=3).max() / len(p) for p in parts)
    assert largest_share > 0.8


def test_dirichlet_partition_fills_empty_sites():
    # Prepare: 4 samples of one class over 4 sites with a tiny alpha: draws leave sites empty.
    labels = np.zeros(4, dtype=np.int64)
    # Execute
    parts, _ = dirichlet_partition(labels, 4, alpha=1e-3, seed=0)
    # Assert
    assert sorted(len(p) for p in parts) == [1, 1, 1, 1]
    _assert_exact_cover(parts, 4)


def test_partition_labels_reuses_given_shares_for_another_split():
    # Prepare: shares chosen by hand; the test split has 10 samples per class.
    test = np.repeat(np.arange(2), 10)
    shares = np.array([[0.3, 0.7], [0.6, 0.4]])
    # Execute
    parts, used = partition_labels(test, 2, method="dirichlet", seed=2, proportions=shares)
    # Assert: class 0 -> 3 / 7 samples, class 1 -> 6 / 4 samples.
    np.testing.assert_array_equal(used, shares)
    assert [int((test[p] == 0).sum()) for p in parts] == [3, 7]
    assert [int((test[p] == 1).sum()) for p in parts] == [6, 4]
    _assert_exact_cover(parts, 20)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid_partition(2, 3, seed=0), "cannot give each of 3 sites at least one sample"),
        (lambda: iid_partition(5, 0, seed=0), "The 'num_sites' parameter of iid_partition must be an int >= 1. Got 0"),
        (lambda: dirichlet_partition(np.zeros(5, int), 2, alpha=-1, seed=0),
         "The 'alpha' parameter of dirichlet_partition must be a float in the range (0, inf). Got -1 instead."),
        (lambda: dirichlet_partition(np.zeros((5, 3), int), 2, alpha=1.0, seed=0), "partition 'iid'"),
        (lambda: partition_labels(np.zeros(5, int), 2, method="random"), "must be a str among"),
    ],
)
def test_invalid_arguments_raise_one_line_errors(call, message):
    # Execute
    with pytest.raises(PartitionError) as info:
        call()
    # Assert
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_dirichlet_partition_redraws_with_the_next_seed_when_a_site_is_left_empty():
    # Prepare: 20 samples of 2 classes over 4 sites, alpha 0.5: the draw of seed 1 leaves a
    # site empty, the draw of seed 2 does not. Redrawing with seed 1 again would only give
    # the same empty site, to be filled by moving a sample from the largest site.
    labels = np.arange(20) % 2
    first = split_by_proportions(labels, dirichlet_proportions(2, 4, 0.5, 1), 1)
    second_shares = dirichlet_proportions(2, 4, 0.5, 2)
    second = split_by_proportions(labels, second_shares, 2)
    assert min(len(p) for p in first) == 0 and min(len(p) for p in second) > 0

    # Execute
    parts, shares = dirichlet_partition(labels, 4, alpha=0.5, seed=1)

    # Assert: the draw of seed 2, as it was drawn.
    np.testing.assert_array_equal(shares, second_shares)
    assert all(np.array_equal(p, q) for p, q in zip(parts, second, strict=True))
    _assert_exact_cover(parts, 20)
