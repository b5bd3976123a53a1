"""OOD detection metrics from ID and OOD scores (higher = more in-distribution), via scikit-learn."""

from __future__ import annotations

import numpy as np

from backbench.errors import ProbeInputError

TPR_LEVEL = 0.95


def _check_scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ProbeInputError(f"{name} must be a non-empty 1-D array of scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ProbeInputError(f"{name} contains NaN or infinite scores; check the features they came from")
    return scores


def ood_metrics(scores_id, scores_ood) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR@95%TPR, with ID as the positive class.

    ``aupr_out`` takes OOD as positive (scores negated); ``fpr@95tpr`` is the FPR at the first
    threshold, from the top, whose TPR reaches 0.95. Returns
    ``{"auroc", "aupr_in", "aupr_out", "fpr@95tpr"}`` as floats.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_id, s_ood = _check_scores(scores_id, "scores_id"), _check_scores(scores_ood, "scores_ood")
    scores = np.concatenate([s_id, s_ood])
    is_id = np.r_[np.ones(len(s_id), dtype=np.int8), np.zeros(len(s_ood), dtype=np.int8)]
    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
        "fpr@95tpr": float(fpr[np.searchsorted(tpr, TPR_LEVEL, side="left")]),
    }
