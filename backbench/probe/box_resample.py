"""COCO box AP on resampled images, from the matching ``COCOeval`` did once.

A bootstrap replicate draws eval images with replacement. Repeating an image repeats its
detections (the same scores) and its ground truth, so ``COCOeval.accumulate`` on the
resampled image list equals its computation with every detection and ground-truth box
weighted by its image's multiplicity: cumulative weighted true and false positives, recall
against the weighted number of ground-truth boxes, the precision envelope read at the 101
recall thresholds, and the mean over IoU thresholds, thresholds and the classes that have
ground truth in the replicate. (Copies of one detection are adjacent in the score order, and
within such a run the interpolated precision is the run's last, so collapsing a run into
one weighted step changes nothing.) With every image once it is pycocotools' AP exactly
(tested against ``COCOeval``). :func:`multiplicities` turns resampled positions into those weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

RECALL_THRESHOLDS = np.linspace(0.0, 1.00, 101, endpoint=True)  # pycocotools' Params.recThrs


def multiplicities(rows: np.ndarray, n: int) -> np.ndarray:
    """(B, n) how often each of ``n`` positions occurs in each row of ``rows`` (B, m)."""
    rows = np.asarray(rows)
    counts = np.bincount((rows + n * np.arange(len(rows))[:, None]).ravel(), minlength=len(rows) * n)
    return counts.reshape(len(rows), n).astype(np.float64)


def weighted_box_ap(matches: Mapping[str, Any], weights: np.ndarray) -> np.ndarray:
    """(B,) COCO AP@[.5:.95] (area all, 100 detections) with images weighted by ``weights`` (B, images)."""
    image, label = np.asarray(matches["match_image"]), np.asarray(matches["match_class"])
    score = np.asarray(matches["match_score"])
    counted = ~np.asarray(matches["match_ignore"], dtype=bool)
    tp = np.asarray(matches["match_tp"], dtype=bool) & counted
    fp = ~np.asarray(matches["match_tp"], dtype=bool) & counted
    gt = np.asarray(matches["match_gt"], dtype=np.float64)
    B, n_thr, R = len(weights), tp.shape[1] if tp.ndim == 2 else 10, len(RECALL_THRESHOLDS)
    total, count = np.zeros(B), np.zeros(B)
    for k in range(gt.shape[1]):
        npig = weights @ gt[:, k]  # (B,)
        valid = npig > 0
        if not valid.any():
            continue
        sel = np.flatnonzero(label == k)
        sel = sel[np.argsort(-score[sel], kind="mergesort")]  # accumulate's order: images in turn, then score
        if not len(sel):  # ground truth and no detection: precision 0 at every recall
            count += valid * n_thr * R
            continue
        w = weights[:, image[sel]][:, None, :]  # (B, 1, D)
        tp_sum = np.cumsum(tp[sel].T[None] * w, axis=2)  # (B, T, D)
        fp_sum = np.cumsum(fp[sel].T[None] * w, axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            rc = tp_sum / npig[:, None, None]
        pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
        env = np.maximum.accumulate(pr[..., ::-1], axis=2)[..., ::-1]
        q = _at_recalls(rc, env)  # (B, T, R)
        total += np.where(valid, q.sum(axis=(1, 2)), 0.0)
        count += valid * n_thr * R
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _at_recalls(rc: np.ndarray, env: np.ndarray) -> np.ndarray:
    """``env`` at the first position whose recall reaches each threshold (0 past the end), as
    ``np.searchsorted(rc, thresholds, side="left")`` per row, without a call per row: the
    position for threshold r is how many recalls lie below it."""
    B, T, D = rc.shape
    R = len(RECALL_THRESHOLDS)
    below = np.searchsorted(RECALL_THRESHOLDS, np.nan_to_num(rc, nan=np.inf).ravel(), side="right")  # thresholds <= rc
    rows = np.repeat(np.arange(B * T), D)
    hist = np.bincount(rows * (R + 1) + below, minlength=B * T * (R + 1)).reshape(B * T, R + 1)
    first = np.cumsum(hist, axis=1)[:, :R]  # per threshold r: recalls with fewer than r+1 thresholds below
    flat = env.reshape(B * T, D)
    inside = first < D
    q = np.zeros((B * T, R))
    r_idx, t_idx = np.nonzero(inside)
    q[r_idx, t_idx] = flat[r_idx, first[r_idx, t_idx]]
    return q.reshape(B, T, R)
