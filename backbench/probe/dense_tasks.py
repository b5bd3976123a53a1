"""Dense tasks on the store: the segmentation probe and the detection probe on cached feature maps.

The pure layer is :mod:`backbench.probe.segment` and :mod:`backbench.probe.detect` (maps and
labels in, scores out); this layer opens a request's map groups (:class:`MapArray`, streamed by
row chunks) and the dense labels extraction stored beside them, checks that they describe the
same images, fits, and logs one record whose per-image outcomes (IoU counts, detections) are
arrays in the record's group, for intervals computed later without refitting.

Both tasks read the ``map`` kind unless the request names another map kind (``layer-2:map``);
a request with the default (pooled) features keeps the backbone's own leaderboard row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backbench.errors import ProbeInputError
from backbench.kinds import is_map
from backbench.store.cache import Cache
from backbench.tasks.base import (CS, NUMBER, POS_INT, Param, Record, Resampler, RunOptions, Task, TaskRequest,
                                  logged, register)

DEFAULT_MAP = "map"
# The detection probe's light default pyramid: 64 channels, levels at 2x, 1x and 0.5x the map (strides 8-32 on a
# ViT/16, 16-64 on a CNN). On shapes it scored box AP 0.48 (Lite0) in 70 s where ViTDet's 4-level, 128-channel
# pyramid scored 0.07 in 15 min (12 epochs, 2 CPU cores): pass --scales 4 2 1 0.5 --width 128 for ViTDet's.
DETECT_SCALES = (2.0, 1.0, 0.5)


class _Labels:
    """A sequence view of one kind of dense labels (masks or boxes) for the probes."""

    def __init__(self, labels: Any, kind: str) -> None:
        self.labels, self.kind = labels, kind

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        return self.labels.mask(i) if self.kind == "mask" else self.labels.boxes(i)


def map_kind(request: TaskRequest) -> str:
    """The map kind a dense request reads: ``map`` for the default features, else the one named."""
    if request.features.pooled:
        return DEFAULT_MAP
    kinds = request.features.kinds
    if len(kinds) != 1 or not is_map(kinds[0]):
        raise ProbeInputError(f"{request.task} reads a feature map: use --features map or layer-N:map, "
                              f"not {request.features.spec!r}")
    return kinds[0]


def read_dense(cache: Cache, request: TaskRequest, role: str, kind: str, dense: str):
    """(maps, labels of kind ``dense``, the group) of the request's ``role`` split, checked to
    describe the same images in the same order."""
    from backbench.probe.maps import MapArray
    from backbench.store.dense import read_dense_labels

    split = request.splits[role]
    group = cache.group(request.backbone, request.dataset, split, kind)
    maps = MapArray(group)
    where = f"{request.dataset}/{split}"
    labels = read_dense_labels(cache, request.dataset, split)  # GroupNotFound says how to extract them
    if dense not in labels.dense:
        held = " and ".join(sorted(labels.dense)) or "no dense labels"
        raise ProbeInputError(f"{where} has {held}; {request.task} needs {'masks' if dense == 'mask' else 'boxes'}")
    if labels.fingerprint != group.attrs.get("dataset_fingerprint") or \
            labels.ids != [str(v) for v in group.array("ids")[...]]:
        raise ProbeInputError(f"the dense labels of {where} are not those of {group.path} (another source or "
                              f"--limit); extract both again from one source")
    return maps, labels, group


def _grid(values: Any, default: tuple[float, ...]) -> list[float]:
    return [float(v) for v in (values or default)]


def _segment(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """DINOv2's linear segmentation probe: lr x weight decay chosen on val (else a 10 % holdout)."""
    from backbench.probe.segment import LRS, WEIGHT_DECAYS

    kind = map_kind(request)
    parts = {r: read_dense(cache, request, r, kind, "mask") for r in ("train", "eval", "val") if request.splits.get(r)}
    train_maps, train_labels, _ = parts["train"]
    eval_maps, eval_labels, _ = parts["eval"]
    if train_labels.classes != eval_labels.classes:
        raise ProbeInputError(f"{request.dataset}: train and eval have different classes")
    lrs, wds = _grid(request.params.get("lr"), LRS), _grid(request.params.get("weight_decay"), WEIGHT_DECAYS)
    params = {"lr": lrs, "weight_decay": wds, "epochs": request.params["epochs"],
              "batch_size": request.params["batch_size"], "map": kind,
              "selection": "val" if "val" in parts else ("holdout-10%" if len(lrs) * len(wds) > 1 else "none")}
    record = request.record({g.split: g.attrs["cache_key"] for _, _, g in parts.values()}, params=params)

    def compute() -> Record:
        from backbench.probe.segment import segment_probe

        val = parts.get("val")
        result = segment_probe(
            train_maps, _Labels(train_labels, "mask"), eval_maps, _Labels(eval_labels, "mask"),
            num_classes=len(train_labels.classes), ignore_index=train_labels.ignore_index,
            val_maps=val[0] if val else None, val_masks=_Labels(val[1], "mask") if val else None,
            lrs=lrs, weight_decays=wds, epochs=params["epochs"], batch_size=params["batch_size"],
            device=options.device, seed=request.seed)
        return {"features": kind, "metrics": {**result.metrics, "classes": list(train_labels.classes)},
                "chosen": result.chosen,
                "grid": result.grid,
                "outcomes": {"intersection": result.intersection, "union": result.union,
                             "label_area": result.label_area}}

    return [logged(cache, request, record, compute, options)]


def _detect(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """The frozen-backbone detection probe: simple pyramid + FCOS head, COCO box AP on eval."""
    kind = map_kind(request)
    train_maps, train_labels, train_group = read_dense(cache, request, "train", kind, "boxes")
    eval_maps, eval_labels, eval_group = read_dense(cache, request, "eval", kind, "boxes")
    if train_labels.classes != eval_labels.classes:
        raise ProbeInputError(f"{request.dataset}: train and eval have different classes")
    params = {"lr": float(request.params["lr"]), "weight_decay": float(request.params["weight_decay"]),
              "epochs": request.params["epochs"], "batch_size": request.params["batch_size"],
              "width": request.params["width"], "scales": [float(v) for v in request.params["scales"] or DETECT_SCALES],
              "map": kind}
    record = request.record({g.split: g.attrs["cache_key"] for g in (train_group, eval_group)}, params=params)

    def compute() -> Record:
        from backbench.probe.detect import detect_probe

        result = detect_probe(
            train_maps, _Labels(train_labels, "boxes"), eval_maps, _Labels(eval_labels, "boxes"),
            num_classes=len(train_labels.classes), input_size=train_maps.input_size,
            train_sizes=train_labels.image_sizes, eval_sizes=eval_labels.image_sizes, lr=params["lr"],
            weight_decay=params["weight_decay"], epochs=params["epochs"], batch_size=params["batch_size"],
            width=params["width"], scales=params["scales"], device=options.device, seed=request.seed)
        return {"features": kind, "metrics": result.metrics,
                "outcomes": {**detections_arrays(result.detections), **result.matches}}

    return [logged(cache, request, record, compute, options)]


def resample_miou(record: Record, outcomes: dict[str, Any]) -> Resampler:
    """mIoU on resampled images: each replicate sums the per-image intersection and union counts
    with the images' multiplicities (one matmul), then IoU per class and their mean as
    :func:`~backbench.probe.dense_metrics.iou_from_counts` (classes with no union left out)."""
    from backbench.probe.box_resample import multiplicities

    inter = np.asarray(outcomes["intersection"], dtype=np.float64)
    union = np.asarray(outcomes["union"], dtype=np.float64)
    n = len(inter)

    def weighted(weights) -> np.ndarray:
        i, u = weights[0] @ inter, weights[0] @ union
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(u > 0, i / np.maximum(u, 1), np.nan)
        valid = np.isfinite(iou)
        return np.where(valid.any(axis=1), np.nansum(iou, axis=1) / np.maximum(valid.sum(axis=1), 1), np.nan)

    return Resampler((n,), lambda idx: weighted([multiplicities(idx[0], n)]), weighted)


def resample_box_ap(record: Record, outcomes: dict[str, Any]) -> Resampler | None:
    """Box AP on resampled images from the record's COCOeval matching (None for records
    written before it was kept); see :mod:`backbench.probe.box_resample`."""
    from backbench.probe.box_resample import multiplicities, weighted_box_ap

    if "match_gt" not in outcomes:
        return None
    n = len(outcomes["match_gt"])
    return Resampler((n,), lambda idx: weighted_box_ap(outcomes, multiplicities(idx[0], n)),
                     lambda weights: weighted_box_ap(outcomes, weights[0]))


def detections_arrays(detections: list) -> dict[str, np.ndarray]:
    """Per-image detections ``[(boxes, scores, labels), ...]`` as flat arrays and offsets."""
    counts = [len(np.asarray(s)) for _, s, _ in detections]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b, _, _ in detections]
    return {"det_offsets": offsets,
            "det_boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
            "det_scores": np.concatenate([np.asarray(s, np.float32) for _, s, _ in detections] or [np.zeros(0)]
                                         ).astype(np.float32),
            "det_labels": np.concatenate([np.asarray(lab, np.int64) for _, _, lab in detections] or [np.zeros(0)]
                                         ).astype(np.int64)}


_LISTS = (CS[0], "a non-empty list of positive numbers, e.g. [0.001, 0.01]", CS[2])
_SCALES = (CS[0], "a non-empty list of pyramid scales of the map, e.g. [4, 2, 1, 0.5] (ViTDet's)", CS[2])
SEGMENTATION = register(Task(
    "segmentation", _segment,
    {"lr": Param(None, *_LISTS), "weight_decay": Param(None, *_LISTS), "epochs": Param(20, *POS_INT),
     "batch_size": Param(16, *POS_INT)},
    optional_roles=("val",), metric="miou", cli="segment", dense="mask", resample=resample_miou,
    help="Linear segmentation probe (DINOv2's BN + 1x1 conv) on cached feature maps: mIoU."))
DETECTION = register(Task(
    "detection", _detect,
    {"lr": Param(3e-3, *NUMBER), "weight_decay": Param(1e-4, *NUMBER), "epochs": Param(20, *POS_INT),
     "batch_size": Param(8, *POS_INT),
     "width": Param(64, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 32 and v % 32 == 0,
                    "a multiple of 32 (FCOS's GroupNorm(32)), e.g. 64", int),
     "scales": Param(list(DETECT_SCALES), *_SCALES)},
    metric="ap", cli="detect", dense="boxes", resample=resample_box_ap,
    help="Detection probe (simple feature pyramid + FCOS head) on cached feature maps: COCO box AP."))
