"""Classification metrics of a probe, from predicted probabilities (scikit-learn where it has them)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from backbench.errors import ProbeInputError

ECE_BINS = 15


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: bin rows by confidence into ``n_bins`` equal-width bins ``(lo, hi]``; weighted |accuracy - confidence|."""
    correct = np.asarray(correct, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / count.sum())


def classification_metrics(y_true, proba, labels) -> dict[str, Any]:
    """top1, top5 (more than 5 classes), mean_per_class (balanced accuracy), log_loss, ece, confusion_matrix.

    ``proba`` is (n, len(labels)), its columns in the order of ``labels``.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, log_loss,
                                 top_k_accuracy_score)

    y_true, proba, labels = np.asarray(y_true), np.asarray(proba, dtype=np.float64), np.asarray(labels)
    if proba.ndim != 2 or proba.shape[1] != len(labels):
        raise ProbeInputError(f"proba must be (samples, {len(labels)} labels), got shape {proba.shape}")
    if len(y_true) != len(proba):
        raise ProbeInputError(f"y_true has {len(y_true)} labels but proba has {len(proba)} rows; they must match")
    if len(y_true) == 0:
        raise ProbeInputError("no samples to evaluate: y_true is empty")
    top = proba.argmax(1)
    y_pred = labels[top]
    out: dict[str, Any] = {"n": int(len(y_true)), "top1": float(accuracy_score(y_true, y_pred))}
    if len(labels) > 5:
        out["top5"] = float(top_k_accuracy_score(y_true, proba, k=5, labels=labels))
    with warnings.catch_warnings():  # a probe may predict a class absent from y_true: expected
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out["mean_per_class"] = float(balanced_accuracy_score(y_true, y_pred))
    out["log_loss"] = float(log_loss(y_true, proba, labels=labels))
    out["ece"] = expected_calibration_error(y_pred == y_true, proba[np.arange(len(proba)), top])
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out
