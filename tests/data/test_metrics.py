"""Metrics against hand-computed values (and sklearn where the definitions coincide)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, multilabel_confusion_matrix, roc_auc_score

from medfed.data import classification_metrics, confusion, equity_scaled, group_metrics


def _binary_scores(p1):
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


def test_binary_metrics_by_hand():
    # Prepare: predictions (argmax) 0,1,0,1,0
    y_true = np.array([[0], [0], [0], [1], [1]])
    y_score = _binary_scores([0.2, 0.7, 0.3, 0.9, 0.4])
    # Execute
    metrics = classification_metrics("binary-class", y_true, y_score)
    # Assert
    # acc: 3 of 5 right; balanced: recall0 = 2/3, recall1 = 1/2
    # auc: positive 0.9 beats all three negatives, 0.4 beats 0.2 and 0.3 -> 5 of 6 pairs
    assert metrics == pytest.approx({"acc": 3 / 5, "auc": 5 / 6, "balanced_acc": (2 / 3 + 1 / 2) / 2})


def test_binary_accepts_positive_class_probabilities():
    p1 = [0.2, 0.7, 0.3, 0.9, 0.4]
    y_true = [0, 0, 0, 1, 1]
    assert classification_metrics("binary-class", y_true, np.array(p1)) == pytest.approx(
        classification_metrics("binary-class", y_true, _binary_scores(p1))
    )


def test_multi_class_metrics_by_hand():
    # Prepare: predictions 0,1,1,2
    y_true = np.array([0, 1, 2, 2])
    y_score = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    # Execute
    metrics = classification_metrics("multi-class", y_true, y_score)
    # Assert
    # one-vs-rest AUCs: class 0 -> 1; class 1 -> 0.4 beats 0.2, 0.2, not 0.5 -> 2/3;
    # class 2 -> positives 0.3, 0.7 vs negatives 0.1, 0.3: 1 + 0.5 (tie) + 1 + 1 = 3.5 / 4
    expected_auc = (1 + 2 / 3 + 3.5 / 4) / 3
    assert metrics == pytest.approx({"acc": 3 / 4, "auc": expected_auc, "balanced_acc": (1 + 1 + 0.5) / 3})
    assert metrics["auc"] == pytest.approx(roc_auc_score(y_true, y_score, multi_class="ovr"))


def test_multi_class_auc_averages_over_classes_present():
    # Prepare: class 2 never occurs in y_true
    y_true = np.array([0, 0, 1, 1])
    y_score = np.array([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.2, 0.7, 0.1], [0.55, 0.35, 0.1]])
    # Execute
    metrics = classification_metrics("multi-class", y_true, y_score)
    # Assert: class 0 AUC 3/4 (0.5 < 0.55), class 1 AUC 1; class 2 left out
    assert metrics == pytest.approx({"acc": 3 / 4, "auc": (3 / 4 + 1) / 2, "balanced_acc": (1 + 1 / 2) / 2})


def test_ordinal_regression_is_scored_as_multi_class():
    y_true = np.array([0, 1, 2, 2])
    y_score = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    assert classification_metrics("ordinal-regression", y_true, y_score) == classification_metrics(
        "multi-class", y_true, y_score
    )


def test_multi_label_metrics_by_hand():
    # Prepare: predictions at 0.5 -> label 0: 1,0,0,1; label 1: 0,1,1,0
    y_true = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    y_score = np.array([[0.8, 0.4], [0.3, 0.6], [0.4, 0.7], [0.6, 0.2]])
    # Execute
    metrics = classification_metrics("multi-label, binary-class", y_true, y_score)
    matrices = confusion("multi-label", y_true, y_score)
    # Assert
    # label 0: acc 2/4, balanced 1/2, AUC: 0.8 beats 0.3 and 0.6, 0.4 beats 0.3 -> 3/4
    # label 1: everything right -> 1, 1, 1
    assert metrics == pytest.approx({"acc": (0.5 + 1) / 2, "auc": (0.75 + 1) / 2, "balanced_acc": (0.5 + 1) / 2})
    assert matrices.tolist() == [[[1, 1], [1, 1]], [[2, 0], [0, 2]]]
    np.testing.assert_array_equal(matrices, multilabel_confusion_matrix(y_true, (y_score > 0.5).astype(int)))


def test_multi_label_auc_skips_labels_with_one_class():
    # Prepare: label 1 is never positive
    y_true = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    y_score = np.array([[0.8, 0.9], [0.3, 0.1], [0.4, 0.2], [0.6, 0.2]])
    # Execute
    metrics = classification_metrics("multi-label", y_true, y_score)
    # Assert: label 0 AUC 3/4; label 1 undefined and left out; label 1 accuracy 3/4 (one false positive)
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["acc"] == pytest.approx((0.5 + 0.75) / 2)


def test_auc_is_nan_when_only_one_class_present():
    metrics = classification_metrics("binary-class", [1, 1, 1], _binary_scores([0.2, 0.8, 0.9]))
    assert math.isnan(metrics["auc"])
    assert metrics["acc"] == pytest.approx(2 / 3) and metrics["balanced_acc"] == pytest.approx(2 / 3)


def test_balanced_accuracy_matches_sklearn_when_a_predicted_class_is_absent():
    # Prepare: class 3 is predicted but never true
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=50)
    y_score = rng.dirichlet(np.ones(4), size=50)
    # Execute
    metrics = classification_metrics("multi-class", y_true, y_score)
    # Assert
    with pytest.warns(UserWarning):
        expected = balanced_accuracy_score(y_true, y_score.argmax(axis=1))
    assert metrics["balanced_acc"] == pytest.approx(expected)


def test_non_finite_scores_give_nan_metrics_with_a_warning():
    y_score = _binary_scores([0.2, np.nan])
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        metrics = classification_metrics("binary-class", [0, 1], y_score)
    assert all(math.isnan(value) for value in metrics.values())


def test_confusion_rows_are_true_classes():
    y_true = np.array([0, 1, 2, 2])
    y_score = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    matrix = confusion("multi-class", y_true, y_score)
    assert matrix.dtype == np.int64
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_bad_shapes_and_labels_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        classification_metrics("multi-class", [0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics("multi-class", [0, 1, 2], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="'task'"):
        classification_metrics("regression", [0], np.ones((1, 2)))
    # Three columns for a binary task: column 1 would silently be taken as the positive class.
    with pytest.raises(ValueError, match=r"Binary-class y_score must be \[N, 2\]"):
        classification_metrics("binary-class", [0, 1], np.full((2, 3), 1 / 3))


def test_group_metrics_per_known_group():
    # Prepare: group 0 predicted perfectly, group 1 entirely wrong, the last sample's group unknown
    y_true = np.array([0, 1, 0, 1, 1])
    y_score = _binary_scores([0.2, 0.8, 0.6, 0.3, 0.9])
    groups = np.array([0, 0, 1, 1, -1])
    # Execute
    result = group_metrics("binary-class", y_true, y_score, groups)
    # Assert
    assert list(result) == [0, 1]
    assert result[0] == pytest.approx({"acc": 1.0, "auc": 1.0, "balanced_acc": 1.0, "num_examples": 2})
    assert result[1] == pytest.approx({"acc": 0.0, "auc": 0.0, "balanced_acc": 0.0, "num_examples": 2})


def test_equity_scaled_by_hand():
    # overall 0.8; groups 0.7, 0.9, 0.8 -> disparity 0.1 + 0.1 + 0 = 0.2
    assert equity_scaled(0.8, [0.7, 0.9, 0.8]) == pytest.approx(0.8 / 1.2)
    assert equity_scaled(0.8, {0: 0.7, 1: 0.9, 2: 0.8}, alpha=0.5) == pytest.approx(0.8 / 1.1)
    assert equity_scaled(0.8, [0.8, 0.8]) == pytest.approx(0.8)
    assert equity_scaled(0.8, [0.7, float("nan")]) == pytest.approx(0.8 / 1.1)  # nan group left out
    assert math.isnan(equity_scaled(float("nan"), [0.5]))
    # Every group one class (group = label): no disparity is measured; it read as perfect equity.
    assert math.isnan(equity_scaled(0.8, [float("nan"), float("nan")]))
    with pytest.raises(ValueError, match="'alpha'"):
        equity_scaled(0.8, [0.7], alpha=-1)
