"""Pooled-test metrics from summed confusion matrices and score histograms."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfed.data import confusion
from medfed.data.pooled import SCORE_BINS, auc_from_histograms, pooled_metrics, score_histograms


def test_histogram_auc_of_well_separated_bins_is_exact():
    # Prepare: hand-computed: positives at 0.9, 0.8, 0.3; negatives at 0.1, 0.2, 0.35 (distinct
    # bins): 8 of 9 pairs ordered right (0.3 < 0.35 is the one wrong pair) -> AUC 8/9.
    y_true = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.1, 0.2, 0.35])
    # Execute
    hist = score_histograms("binary-class", y_true, np.stack([1 - p, p], 1))
    # Assert
    assert hist.shape == (1, 2, SCORE_BINS) and hist.sum() == 6
    assert auc_from_histograms(hist) == pytest.approx(8 / 9)


def test_summed_site_histograms_give_the_pooled_auc_within_its_bound():
    # Prepare: three sites' scores; the pooled AUC is sklearn's on the union.
    rng = np.random.default_rng(0)
    sites = []
    for shift in (0.0, 0.5, 1.0):
        y = rng.integers(0, 2, 200)
        logits = rng.normal(size=200) + 1.5 * y + shift
        p = 1 / (1 + np.exp(-logits))
        sites.append((y, np.stack([1 - p, p], 1)))
    # Execute
    hist = sum(score_histograms("binary-class", y, s) for y, s in sites)
    matrix = sum(confusion("binary-class", y, s) for y, s in sites)
    pooled = pooled_metrics("binary-class", matrix, hist)
    # Assert
    y_all = np.concatenate([y for y, _ in sites])
    s_all = np.concatenate([s[:, 1] for _, s in sites])
    error = abs(pooled["auc"] - roc_auc_score(y_all, s_all))
    assert error <= pooled["auc_error_bound"] + 1e-12
    assert pooled["auc_error_bound"] < 0.01 and error < 0.002
    assert pooled["acc"] == pytest.approx(np.mean((s_all > 0.5) == y_all))
    assert pooled["num_examples"] == 600


def test_multiclass_histograms_are_one_vs_rest_per_class():
    y = np.array([0, 1, 2, 2])
    scores = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]])
    hist = score_histograms("multi-class", y, scores)
    assert hist.shape == (3, 2, SCORE_BINS)
    assert hist[2, 1].sum() == 2 and hist[2, 0].sum() == 2
    assert auc_from_histograms(hist[:1]) == 1.0  # class 0: positive 0.8 above negatives 0.1, 0.1, 0.6


@pytest.mark.parametrize("task", ["binary-class", "multi-class", "multi-label, binary-class"])
def test_a_site_whose_scores_are_not_finite_makes_the_pool_undefined_not_class_0(task):
    # Prepare: a healthy site and a diverged one (NaN scores), as a round's evaluate replies.
    # The argmax of NaN is 0, and NaN cast to a bin index lands somewhere: the pool read
    # ACC 0.27 and AUC 0.5 for a model whose every score was NaN.
    from medfed.server.recording import pooled_round_metrics

    rng = np.random.default_rng(0)
    replies = []
    for broken in (False, True):
        if task == "multi-label, binary-class":
            y, p = rng.integers(0, 2, (20, 3)), rng.random((20, 3))
        else:
            y, p = rng.integers(0, 3 if task == "multi-class" else 2, 20), rng.dirichlet(
                np.ones(3 if task == "multi-class" else 2), 20)
        if broken:
            p = np.full_like(p, np.nan)
        matrix, hist = confusion(task, y, p), score_histograms(task, y, p)
        replies.append({"num-examples": 20, "num-classes": int(matrix.shape[-1] if matrix.ndim == 2 else matrix.shape[0]),
                        "confusion": [int(v) for v in matrix.reshape(-1)], "score-hist": [int(v) for v in hist.reshape(-1)]})
        if broken:  # its samples are in no cell and no bin
            assert matrix.sum() == 0 and hist.sum() == 0

    # Execute
    healthy = pooled_round_metrics(task, replies[:1])
    pooled = pooled_round_metrics(task, replies)

    # Assert: defined for the healthy site alone, undefined once the diverged one is pooled.
    assert np.isfinite([healthy["acc"], healthy["auc"], healthy["balanced_acc"]]).all()
    assert np.isnan([pooled["acc"], pooled["auc"], pooled["balanced_acc"]]).all() and pooled["num_examples"] == 40


def test_four_labels_are_pooled_as_four_two_by_two_matrices_not_one_four_by_four():
    # A multi-label confusion of L labels holds 4 L values, which for L = 4 is also C * C.
    from medfed.server.recording import _matrix, pooled_round_metrics

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, (30, 4)), rng.random((30, 4))
    matrix, hist = confusion("multi-label", y, p), score_histograms("multi-label", y, p)
    flat = [int(v) for v in matrix.reshape(-1)]
    reply = {"num-examples": 30, "num-classes": 4, "confusion": flat, "score-hist": [int(v) for v in hist.reshape(-1)]}
    pooled = pooled_round_metrics("multi-label, binary-class", [reply, reply])
    expected = pooled_metrics("multi-label, binary-class", 2 * matrix, 2 * hist)
    assert pooled["acc"] == pytest.approx(expected["acc"]) and pooled["auc"] == pytest.approx(expected["auc"])
    assert np.asarray(_matrix(flat, 4, multi_label=True)).shape == (4, 2, 2)
    assert np.asarray(_matrix(list(range(16)), 4, multi_label=False)).shape == (4, 4)


def test_a_pool_one_sample_short_of_its_num_examples_is_undefined():
    # Prepare: 20 samples of which one has a NaN score: the confusion and the histogram count
    # 19. A single missing sample already makes the pool undefined, not only a missing site.
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 10)
    p = rng.random(20)
    scores = np.stack([1 - p, p], 1)
    scores[3] = np.nan
    matrix, hist = confusion("binary-class", y, scores), score_histograms("binary-class", y, scores)
    assert matrix.sum() == 19 and hist.sum() == 19

    # Execute
    short = pooled_metrics("binary-class", matrix, hist, num_examples=20)
    full = pooled_metrics("binary-class", matrix, hist, num_examples=19)

    # Assert
    assert np.isnan([short["acc"], short["auc"], short["balanced_acc"]]).all() and short["num_examples"] == 20
    assert np.isfinite([full["acc"], full["auc"], full["balanced_acc"]]).all() and full["num_examples"] == 19
