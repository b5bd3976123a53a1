"""Dense metrics: IoU from a confusion matrix (as mmsegmentation) and COCO box AP (pycocotools).

Segmentation counts are kept per image (intersection, union, label area per class), so a
record can later be resampled by image for intervals without refitting; the metrics sum them
first. A class whose union is 0 (absent from both labels and predictions) has IoU NaN and is
left out of the mean, as mmsegmentation's ``mean_iou`` does. Light: numpy at import; torch and
pycocotools when a function is called.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np

from backbench.errors import ProbeInputError, require


def confusion(pred: Any, label: Any, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(C, C) int64 confusion matrix, rows the label, columns the prediction; ``ignore_index`` pixels skipped.

    ``pred`` and ``label`` are integer arrays (numpy or torch) of one shape. A label or prediction
    outside ``0..num_classes-1`` (other than the ignored value in the label) is refused.
    """
    import torch

    pred, label = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(label).reshape(-1).long()
    if pred.shape != label.shape:
        raise ProbeInputError(f"pred has {pred.numel()} pixels but label has {label.numel()}; they must match")
    if ignore_index is not None:
        keep = label != ignore_index
        pred, label = pred[keep], label[keep].to(pred.device)
    for name, values in (("label", label), ("pred", pred)):
        low, high = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
        if low < 0 or high >= num_classes:
            raise ProbeInputError(f"{name} holds class {low if low < 0 else high} outside 0..{num_classes - 1} "
                                  f"(ignore_index {ignore_index}); check num_classes")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def counts(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(intersection, union, label_area)`` per class from a confusion matrix (rows the label)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    intersection = np.diag(matrix).copy()
    label_area = matrix.sum(1)
    return intersection, label_area + matrix.sum(0) - intersection, label_area


def iou_from_counts(intersection: Any, union: Any, label_area: Any = None) -> dict[str, Any]:
    """Per-class IoU (NaN where the union is 0), its mean over the other classes, and accuracies.

    Counts are (C,) or per image (n, C), summed over images first. Returns ``{"iou": (C,) array,
    "miou"}``, plus ``"pixel_acc"`` (mmseg's aAcc: correct / labelled pixels) and ``"mean_acc"``
    (mean per-class accuracy over classes present in the labels) when ``label_area`` is given.
    Means over no class at all are NaN.
    """
    inter, uni = _summed(intersection), _summed(union)
    if inter.shape != uni.shape:
        raise ProbeInputError(f"intersection has shape {inter.shape} but union has {uni.shape}; they must match")
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(uni > 0, inter / np.maximum(uni, 1), np.nan)
    out: dict[str, Any] = {"iou": iou, "miou": _nanmean(iou)}
    if label_area is not None:
        area = _summed(label_area)
        out["pixel_acc"] = float(inter.sum() / area.sum()) if area.sum() else float("nan")
        out["mean_acc"] = _nanmean(np.where(area > 0, inter / np.maximum(area, 1), np.nan))
    return out


def _summed(values: Any) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    return values.sum(0) if values.ndim == 2 else values


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ----------------------------------------------------------------------------- COCO box AP


def coco_box_ap(gt: Sequence, detections: Sequence, sizes: Any, num_classes: int) -> dict[str, float]:
    """COCO box AP, AP50 and AP75 (see :func:`coco_box_eval`)."""
    return coco_box_eval(gt, detections, sizes, num_classes)[0]


def coco_box_eval(gt: Sequence, detections: Sequence, sizes: Any,
                  num_classes: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(metrics, matches): COCO box AP, AP50 and AP75 by pycocotools' ``COCOeval`` on COCO objects
    built in memory, and its per-detection matching (:func:`coco_matches`) for resampling.

    ``gt``: per image ``((M, 4) xyxy boxes, (M,) labels)``; ``detections``: per image
    ``(boxes, scores, labels)``; ``sizes``: (n, 2) image (H, W); all in original pixels, labels
    in ``0..num_classes-1``. Ground truth is never crowd. A metric COCOeval cannot compute (no
    ground-truth box at all) is NaN; no detection gives 0.
    """
    cocoeval = require("pycocotools.cocoeval", extra="dense")
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if not len(gt) == len(detections) == len(sizes):
        raise ProbeInputError(f"coco_box_ap: {len(gt)} ground truths, {len(detections)} detections and "
                              f"{len(sizes)} sizes; they must match (one per image)")
    images = [{"id": i + 1, "height": int(h), "width": int(w)} for i, (h, w) in enumerate(sizes)]
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    truth, found = [], []
    for i, (boxes, labels) in enumerate(gt):
        truth += _annotations(i, boxes, labels, None, num_classes, len(truth))
    for i, (boxes, scores, labels) in enumerate(detections):
        found += _annotations(i, boxes, labels, scores, num_classes, len(found))
    coco_gt, coco_dt = (_coco(images, categories, anns) for anns in (truth, found))
    evaluator = cocoeval.COCOeval(coco_gt, coco_dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (float(s) if s >= 0 else float("nan") for s in evaluator.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75}, coco_matches(evaluator)


def coco_matches(evaluator: Any) -> dict[str, np.ndarray]:
    """What ``COCOeval.accumulate`` reads for AP (area "all", the largest maxDets), as arrays:
    per kept detection its ``match_image``, ``match_class``, ``match_score``, ``match_tp``
    (T IoU thresholds: matched a ground truth) and ``match_ignore``; ``match_gt`` (images,
    classes): the ground-truth boxes that count. AP recomputed from them on resampled images
    is :func:`backbench.probe.box_resample.weighted_box_ap`."""
    p = evaluator.params
    n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
    all_area = list(p.areaRngLbl).index("all")
    image, label, score, tp, ignore = [], [], [], [], []
    gt = np.zeros((n_img, len(p.catIds)), dtype=np.int32)
    for k in range(len(p.catIds)):
        for i in range(n_img):
            e = evaluator.evalImgs[k * n_area * n_img + all_area * n_img + i]
            if e is None:
                continue
            gt[i, k] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            d = len(e["dtScores"][:max_det])
            image.append(np.full(d, i, np.int32))
            label.append(np.full(d, k, np.int32))
            score.append(np.asarray(e["dtScores"][:max_det], np.float64))
            tp.append(np.asarray(e["dtMatches"])[:, :max_det].T != 0)
            ignore.append(np.asarray(e["dtIgnore"], dtype=bool)[:, :max_det].T)
    n_thr = len(p.iouThrs)
    return {"match_image": np.concatenate(image or [np.zeros(0, np.int32)]),
            "match_class": np.concatenate(label or [np.zeros(0, np.int32)]),
            "match_score": np.concatenate(score or [np.zeros(0)]),
            "match_tp": np.concatenate(tp or [np.zeros((0, n_thr), bool)]),
            "match_ignore": np.concatenate(ignore or [np.zeros((0, n_thr), bool)]),
            "match_gt": gt}


def _annotations(image: int, boxes: Any, labels: Any, scores: Any, num_classes: int, first_id: int) -> list[dict]:
    """COCO annotation dicts (xywh boxes, area, iscrowd 0; a score for detections) of one image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ProbeInputError(f"image {image}: {len(boxes)} boxes but {len(labels)} labels"
                              + ("" if scores is None else f" and {len(scores)} scores") + "; they must match")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ProbeInputError(f"image {image}: box label outside 0..{num_classes - 1}; check num_classes")
    out = []
    for j, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, labels)):
        w, h = x2 - x1, y2 - y1
        ann = {"id": first_id + j + 1, "image_id": image + 1, "category_id": int(label) + 1,
               "bbox": [float(x1), float(y1), float(w), float(h)], "area": float(w * h), "iscrowd": 0}
        if scores is not None:
            ann["score"] = float(scores[j])
        out.append(ann)
    return out


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]):
    """A pycocotools ``COCO`` object from in-memory lists (no JSON file; what ``loadRes`` builds)."""
    coco_module = require("pycocotools.coco", extra="dense")
    coco = coco_module.COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
