"""Pooled-test metrics from what sites may send: confusion matrices and score histograms.

A federation's "global" figure is most often the sample-weighted mean of the sites'
own metrics. What a reader expects is the metric over the union of the sites' test
sets (the pooled test set). Accuracy and balanced accuracy follow exactly from the
summed confusion matrices. AUC needs the scores themselves; sending every test sample's
score would tell the server each sample's prediction, so a site sends instead, per
class (one-vs-rest; the positive class for binary tasks; per label for multi-label), a
histogram of the scores of its positive and of its negative samples over fixed bins.
Histograms add up across sites, and the AUC of the pooled histograms is the AUC of the
pooled scores with the scores inside a bin counted as ties: with :data:`SCORE_BINS`
bins equally spaced in logit between -8 and 8 (0.08 logit wide), the error is at most
half the fraction of (positive, negative) pairs that share a bin, and
:func:`auc_from_histograms` can report that bound.

Payload per site and evaluation: ``K * 2 * SCORE_BINS`` integers (K = 1 for binary).
"""

from __future__ import annotations

import math

import numpy as np

from .info import BINARY_CLASS, MULTI_LABEL, normalize_task
from .metrics import accuracies_from_confusion

__all__ = ["SCORE_BINS", "auc_from_histograms", "pooled_metrics", "score_histograms"]

#: Number of score bins per class and side (positives / negatives).
SCORE_BINS = 200
_LOGIT_RANGE = 8.0


def _bin_index(scores: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    logits = np.clip(np.log(p / (1 - p)), -_LOGIT_RANGE, _LOGIT_RANGE)
    index = np.floor((logits + _LOGIT_RANGE) / (2 * _LOGIT_RANGE) * SCORE_BINS).astype(np.int64)
    return np.clip(index, 0, SCORE_BINS - 1)


def score_histograms(task: str, y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Histograms of the scores of positive and negative samples, per class.

    Parameters
    ----------
    task : str
        MedMNIST task.
    y_true : np.ndarray
        ``[N]`` class indices (multi-label ``[N, L]`` of 0/1).
    y_score : np.ndarray
        ``[N, C]`` probabilities (softmax; sigmoid for multi-label).

    Returns
    -------
    np.ndarray
        ``int64`` ``[K, 2, SCORE_BINS]``: ``[k, 1]`` counts the positives of class ``k``
        per bin of their score for ``k``, ``[k, 0]`` the negatives. K is 1 for binary
        tasks (the positive class's score), C for multi-class, L for multi-label. A score
        that is not finite (a diverged model) is in no bin, so that a pool can tell
        (:func:`pooled_metrics`' ``num_examples``) instead of binning NaN as a score.
    """
    task = normalize_task(task)
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    if task == MULTI_LABEL:
        positives, scores = y_true.astype(bool), y_score
    elif task == BINARY_CLASS:
        positives, scores = (y_true.reshape(-1) == 1)[:, None], y_score[:, 1:2]
    else:
        labels = y_true.reshape(-1)
        positives = labels[:, None] == np.arange(y_score.shape[1])[None, :]
        scores = y_score
    num_outputs = scores.shape[1]
    hist = np.zeros((num_outputs, 2, SCORE_BINS), dtype=np.int64)
    finite = np.isfinite(scores)
    bins = _bin_index(np.where(finite, scores, 0.5))
    for k in range(num_outputs):
        hist[k, 1] = np.bincount(bins[positives[:, k] & finite[:, k], k], minlength=SCORE_BINS)
        hist[k, 0] = np.bincount(bins[~positives[:, k] & finite[:, k], k], minlength=SCORE_BINS)
    return hist


def auc_from_histograms(hist: np.ndarray, *, with_bound: bool = False) -> float | tuple[float, float]:
    """Macro AUC over the outputs whose positives and negatives are both present.

    Within a bin, positive and negative scores count as ties (1/2). ``nan`` when no
    output has both. With ``with_bound``, also return the largest possible error
    (half the tied-pair fraction, averaged like the AUC).
    """
    hist = np.asarray(hist, dtype=np.float64)
    aucs, bounds = [], []
    for negatives, positives in hist:
        n_neg, n_pos = negatives.sum(), positives.sum()
        if n_neg == 0 or n_pos == 0:
            continue
        below = np.cumsum(negatives) - negatives  # negatives in lower bins
        wins = float(np.sum(positives * (below + 0.5 * negatives)))
        aucs.append(wins / (n_pos * n_neg))
        bounds.append(0.5 * float(np.sum(positives * negatives)) / (n_pos * n_neg))
    auc = float(np.mean(aucs)) if aucs else float("nan")
    bound = float(np.mean(bounds)) if bounds else float("nan")
    return (auc, bound) if with_bound else auc


def pooled_metrics(
    task: str, confusion: np.ndarray, hist: np.ndarray, num_examples: int | None = None
) -> dict[str, float]:
    """ACC and balanced ACC (exact) and AUC (histogram) of pooled test sets.

    Parameters
    ----------
    task : str
        MedMNIST task.
    confusion : np.ndarray
        Summed confusion: ``[C, C]`` (rows true), multi-label ``[L, 2, 2]``.
    hist : np.ndarray
        Summed :func:`score_histograms`.
    num_examples : int, optional
        The samples of the pool (the sites' ``num-examples``). When the confusion or a
        histogram counts fewer, some site's model gave scores that are not finite; the
        metrics of the pool are then undefined (``nan``), not those of the samples left.

    Returns
    -------
    dict
        ``acc``, ``auc``, ``balanced_acc``, ``auc_error_bound`` and ``num_examples``;
        metrics are ``nan`` for an empty pool.
    """
    task = normalize_task(task)
    confusion = np.asarray(confusion, dtype=np.float64)
    if num_examples is not None and _counted(confusion, hist, task) < num_examples:
        return {"acc": math.nan, "auc": math.nan, "balanced_acc": math.nan, "auc_error_bound": math.nan,
                "num_examples": int(num_examples)}
    auc, bound = auc_from_histograms(hist, with_bound=True)
    acc, balanced_acc = accuracies_from_confusion(task, confusion)
    n = int(confusion[0].sum() if task == MULTI_LABEL and confusion.size else confusion.sum())
    return {"acc": acc, "auc": auc, "balanced_acc": balanced_acc, "auc_error_bound": bound, "num_examples": n}


def _counted(confusion: np.ndarray, hist: np.ndarray, task: str) -> int:
    """The fewest samples that the confusion (per label) or any histogram output counts."""
    per_output = np.asarray(hist).reshape(-1, 2 * SCORE_BINS).sum(axis=1)
    in_confusion = confusion.reshape(confusion.shape[0], -1).sum(axis=1) if task == MULTI_LABEL else [confusion.sum()]
    return int(min([*per_output, *in_confusion]))
