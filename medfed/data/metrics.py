"""Classification metrics as MedMNIST reports them, per-group metrics and ES-AUC.

ACC and AUC follow MedMNIST v2's evaluator (Yang et al., Scientific Data 10, 41, 2023):

- multi-class / ordinal-regression: ACC = argmax accuracy; AUC = one-vs-rest macro AUC
  (the mean over classes of the AUC of ``score[:, c]`` for ``y == c`` against the rest,
  i.e. sklearn's ``roc_auc_score(multi_class="ovr", average="macro")``).
- binary-class: ``y_score`` ``[N, 2]`` (softmax); AUC on the positive-class probability
  ``y_score[:, 1]``; ACC by argmax (the same as the threshold 0.5).
- multi-label: ACC = mean over labels of the per-label accuracy at threshold 0.5; AUC =
  mean of the per-label AUCs.

Where MedMNIST's evaluator would fail (a class absent from ``y_true``, so its one-vs-rest
AUC is undefined), the AUC is averaged over the classes (labels) whose AUC is defined,
i.e. that have both positive and negative samples; with none, AUC is ``nan``.
Balanced accuracy is sklearn's ``balanced_accuracy_score`` (mean recall over the classes
present in ``y_true``); multi-label: mean of the per-label balanced accuracies.

ES-AUC (equity-scaled AUC; Luo et al.'s Harvard fairness datasets, used by FairLoRA) is
``metric / (1 + alpha * sum_g |metric_g - metric|)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping

import numpy as np
from sklearn.metrics import roc_auc_score

from .info import BINARY_CLASS, MULTI_LABEL, normalize_task

__all__ = ["accuracies_from_confusion", "classification_metrics", "confusion", "group_metrics", "equity_scaled"]

_THRESHOLD = 0.5
_METRIC_NAMES = ("acc", "auc", "balanced_acc")


def _prepare(task: str, y_true: np.ndarray, y_score: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """Normalise task and shapes: y_true [N] int (multi-label [N, L]), y_score [N, C] float64."""
    task = normalize_task(task)
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if task == BINARY_CLASS and y_score.ndim == 1:
        y_score = np.stack([1.0 - y_score, y_score], axis=1)
    elif task == BINARY_CLASS and y_score.ndim == 2 and y_score.shape[1] == 1:
        y_score = np.concatenate([1.0 - y_score, y_score], axis=1)
    if y_score.ndim != 2:
        raise ValueError(f"y_score must be [N, C] probabilities ({task}). Got shape {y_score.shape} instead.")
    if task == MULTI_LABEL:
        if y_true.shape != y_score.shape:
            raise ValueError(
                f"Multi-label y_true must have y_score's shape {y_score.shape}. Got {y_true.shape} instead."
            )
        return task, y_true.astype(np.int64), y_score
    if y_true.ndim == 2 and y_true.shape[1] == 1:
        y_true = y_true[:, 0]
    if y_true.shape != (y_score.shape[0],):
        n = y_score.shape[0]
        raise ValueError(f"y_true must have shape ({n},) or ({n}, 1) like y_score [N, C]. Got {y_true.shape} instead.")
    y_true = y_true.astype(np.int64)
    if y_true.size and (y_true.min() < 0 or y_true.max() >= y_score.shape[1]):
        raise ValueError(
            f"y_true must hold class indices in [0, {y_score.shape[1] - 1}] (y_score has {y_score.shape[1]} columns). "
            f"Got values from {y_true.min()} to {y_true.max()} instead."
        )
    if task == BINARY_CLASS and y_score.shape[1] != 2:
        raise ValueError(
            f"Binary-class y_score must be [N, 2] (or [N] positive-class probabilities). Got {y_score.shape} instead."
        )
    return task, y_true, y_score


def _binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """AUC of ``score`` for the 0/1 targets ``y_true``; nan when only one class is present."""
    if y_true.min() == y_true.max():
        return float("nan")
    return float(roc_auc_score(y_true, score))


def accuracies_from_confusion(task: str, matrix: np.ndarray) -> tuple[float, float]:
    """ACC and balanced ACC from a confusion matrix (:func:`confusion`'s layout, or a sum of them).

    Parameters
    ----------
    task : str
        MedMNIST task.
    matrix : np.ndarray
        ``[C, C]`` counts, rows true class; multi-label ``[L, 2, 2]``, one per label.

    Returns
    -------
    tuple[float, float]
        Accuracy and balanced accuracy (mean recall over the classes present; multi-label:
        the means over the labels); ``nan`` for an empty matrix.
    """
    matrices = np.asarray(matrix, dtype=np.float64)
    if normalize_task(task) != MULTI_LABEL:
        matrices = matrices[None]
    if matrices.size == 0 or matrices[0].sum() == 0:
        return float("nan"), float("nan")
    acc, balanced = [], []
    for m in matrices:
        support = m.sum(axis=1)
        present = support > 0
        acc.append(np.trace(m) / m.sum())
        balanced.append(np.mean(np.diag(m)[present] / support[present]))
    return float(np.mean(acc)), float(np.mean(balanced))


def _mean_defined(values: Iterable[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return float(np.mean(defined)) if defined else float("nan")


def classification_metrics(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Return ACC, AUC and balanced accuracy, as MedMNIST reports them.

    Parameters
    ----------
    task : str
        ``"multi-class"``, ``"binary-class"``, ``"multi-label, binary-class"`` or
        ``"ordinal-regression"`` (treated as multi-class).
    y_true : np.ndarray
        Class indices ``[N]`` or ``[N, 1]``; multi-label 0/1 ``[N, L]``.
    y_score : np.ndarray
        Probabilities: softmax ``[N, C]`` (binary ``[N, 2]``, or ``[N]`` positive-class
        probabilities); multi-label sigmoid ``[N, L]``.

    Returns
    -------
    dict[str, float]
        ``"acc"``, ``"auc"``, ``"balanced_acc"``, each in [0, 1]. ``auc`` is ``nan``
        where undefined (see the module docstring); all three are ``nan`` for ``N == 0``
        or non-finite scores (with a warning in the latter case).
    """
    task, y_true, y_score = _prepare(task, y_true, y_score)
    if y_true.shape[0] == 0:
        return dict.fromkeys(_METRIC_NAMES, float("nan"))
    if not np.all(np.isfinite(y_score)):
        warnings.warn(
            f"y_score holds {int(np.sum(~np.isfinite(y_score)))} NaN or infinite values (a diverged model?); "
            "the metrics are reported as nan.",
            RuntimeWarning,
            stacklevel=2,
        )
        return dict.fromkeys(_METRIC_NAMES, float("nan"))
    acc, balanced_acc = accuracies_from_confusion(task, confusion(task, y_true, y_score))
    if task == MULTI_LABEL:
        auc = _mean_defined(_binary_auc(y_true[:, j], y_score[:, j]) for j in range(y_true.shape[1]))
    elif task == BINARY_CLASS:
        auc = _binary_auc(y_true, y_score[:, 1])
    else:
        auc = _mean_defined(_binary_auc((y_true == c).astype(np.int64), y_score[:, c]) for c in range(y_score.shape[1]))
    return {"acc": acc, "auc": auc, "balanced_acc": balanced_acc}


def confusion(task: str, y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Return the confusion matrix: rows true class, columns predicted class.

    Predictions are the argmax of ``y_score`` (multi-label: ``y_score > 0.5``). A sample
    whose scores are not finite (a diverged model) has no prediction and is in no cell
    (multi-label: per label), so the matrix then counts fewer samples than ``y_true``
    holds: the argmax of NaN would have counted it as class 0.

    Returns
    -------
    np.ndarray
        ``int64`` ``[C, C]``; multi-label ``[L, 2, 2]``, one ``[[tn, fp], [fn, tp]]``
        per label (sklearn's ``multilabel_confusion_matrix`` layout).
    """
    task, y_true, y_score = _prepare(task, y_true, y_score)
    if task == MULTI_LABEL:
        y_pred = (y_score > _THRESHOLD).astype(np.int64)
        cells = 2 * y_true + y_pred  # 0 tn, 1 fp, 2 fn, 3 tp
        finite = np.isfinite(y_score)
        counts = [np.bincount(cells[finite[:, j], j], minlength=4) for j in range(y_true.shape[1])]
        return np.array(counts, dtype=np.int64).reshape(y_true.shape[1], 2, 2)
    num_classes = y_score.shape[1]
    finite = np.isfinite(y_score).all(axis=1)
    y_pred = np.argmax(y_score[finite], axis=1)
    flat = np.bincount(y_true[finite] * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.astype(np.int64).reshape(num_classes, num_classes)


def group_metrics(
    task: str, y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray
) -> dict[int, dict[str, float]]:
    """Return :func:`classification_metrics` per patient group.

    Parameters
    ----------
    task, y_true, y_score
        As for :func:`classification_metrics`.
    groups : np.ndarray
        Integer group id per sample ``[N]``; ids < 0 (unknown) are left out.

    Returns
    -------
    dict[int, dict[str, float]]
        Group id (ascending) -> ``{"acc", "auc", "balanced_acc", "num_examples"}``.
    """
    groups = np.asarray(groups).reshape(-1)
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if groups.shape[0] != y_true.shape[0]:
        raise ValueError(f"groups must have one id per sample ({y_true.shape[0]}). Got {groups.shape[0]} instead.")
    result = {}
    for group in np.unique(groups[groups >= 0]):
        mask = groups == group
        metrics = classification_metrics(task, y_true[mask], y_score[mask])
        metrics["num_examples"] = int(mask.sum())
        result[int(group)] = metrics
    return result


def equity_scaled(
    metric_overall: float, per_group_values: Mapping[int, float] | Iterable[float], alpha: float = 1.0
) -> float:
    """Return the equity-scaled metric ``overall / (1 + alpha * sum_g |g - overall|)``.

    With AUC this is FairLoRA's ES-AUC: it equals the overall AUC when every group
    scores the same and shrinks as groups drift apart.

    Parameters
    ----------
    metric_overall : float
        The metric on all samples.
    per_group_values : mapping or iterable of float
        The metric per group (a mapping's values are used). ``nan`` values (metric
        undefined for that group, e.g. AUC of a one-class group) are left out.
    alpha : float, optional
        Weight of the disparity term, >= 0.

    Returns
    -------
    float
        ``nan`` if ``metric_overall`` is ``nan``, or if group values are given and none
        is defined (every group one class: no disparity can be measured, and ``overall``
        would read as perfect equity).
    """
    if not alpha >= 0:
        raise ValueError(f"The 'alpha' parameter of equity_scaled must be a float >= 0. Got {alpha!r} instead.")
    if math.isnan(metric_overall):
        return float("nan")
    values = [float(v) for v in (per_group_values.values() if isinstance(per_group_values, Mapping)
                                 else per_group_values)]
    defined = [value for value in values if not math.isnan(value)]
    if values and not defined:
        return float("nan")
    disparity = sum(abs(value - metric_overall) for value in defined)
    return float(metric_overall / (1.0 + alpha * disparity))
