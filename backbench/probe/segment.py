"""Linear semantic segmentation probe on cached feature maps: DINOv2's linear protocol.

DINOv2's linear segmentation head (``BNHead`` in facebookresearch/dinov2 ``eval/segmentation``,
an mmsegmentation decode head) is BatchNorm2d then a 1x1 Conv2d (weights N(0, 0.01), bias 0)
over the (b, d, h, w) map; its logits are upsampled bilinearly (``align_corners=False``) to
the label's resolution and trained with cross-entropy that skips ``ignore_index``. DINOv2
trains it with AdamW (lr 1e-3, weight decay 1e-4, linear warmup then poly decay): here AdamW
with linear warmup over 4 % of the steps then linear decay to 0, over a small lr x weight
decay grid chosen on val mIoU (else a seeded ``holdout`` of train, then refit on all of
train). The frozen features are cached, so there is no augmentation.

For speed the training loss is taken on labels resized (nearest) to ``label_scale`` times the
map grid (4x by default, ``None``: each label at its full resolution); selection and the final
scores always use every pixel at full resolution. Mini-batches are contiguous row slices of the
maps in a seeded order, so a streamed :class:`~backbench.probe.maps.MapArray` and the same maps
in memory give the same numbers; on the CPU a seed gives the same numbers every run. Heavy
(torch): task modules import it when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backbench.errors import ProbeInputError
from backbench.probe.dense_data import (blocks, check_pair, epoch_blocks, holdout_rows, map_shape, read_block,
                                        same_grid, warmup_linear_decay)
from backbench.probe.dense_metrics import confusion, counts, iou_from_counts

LRS = (1e-3, 3e-3, 1e-2)
WEIGHT_DECAYS = (1e-4, 1e-2)
NO_IGNORE = -100  # torch's cross-entropy default, for labels without an ignored value


@dataclass(frozen=True)
class SegmentResult:
    """Scores on eval, the chosen and tried grid points, and per-image counts (n_eval, C) for bootstraps."""

    metrics: dict
    chosen: dict
    grid: list[dict]
    intersection: np.ndarray
    union: np.ndarray
    label_area: np.ndarray = field(repr=False)


class LinearSegHead(nn.Module):
    """DINOv2's ``BNHead`` on one map: BatchNorm2d(d) then a 1x1 convolution to the class logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv_seg = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.bn(maps))


def segment_probe(train_maps, train_masks: Sequence, eval_maps, eval_masks: Sequence, *, num_classes: int,
                  ignore_index: int | None, val_maps=None, val_masks: Sequence | None = None,
                  lrs: Sequence[float] = LRS, weight_decays: Sequence[float] = WEIGHT_DECAYS, epochs: int = 20,
                  batch_size: int = 16, label_scale: int | None = 4, device: str = "cpu", seed: int = 0,
                  holdout: float = 0.1) -> SegmentResult:
    """Fit the linear head over the grid, choose on val mIoU (or a holdout of train), score eval.

    Maps are (n, h, w, d) array-likes read by row slices; masks are sequences of (H, W) integer
    arrays at each image's full resolution, values in ``0..num_classes-1`` or ``ignore_index``.
    With val given, the grid's fit on train with the chosen values is the final head; with a
    holdout, the chosen values are refit on all of train. ``eval`` never enters the choice.
    """
    if num_classes < 2:
        raise ProbeInputError(f"num_classes must be at least 2, got {num_classes}")
    shape = map_shape(train_maps, "train_maps")
    check_pair(shape, train_masks, "train")
    same_grid(shape, map_shape(eval_maps, "eval_maps"), "eval")
    check_pair(eval_maps.shape, eval_masks, "eval")
    grid = [{"lr": float(lr), "weight_decay": float(wd)} for lr in lrs for wd in weight_decays]
    if not grid:
        raise ProbeInputError("lrs and weight_decays must each hold at least one value")
    fit = _Fitter(num_classes, ignore_index, epochs, batch_size, label_scale, device, seed)
    targets = fit.targets(train_masks, shape)
    all_rows = np.ones(shape[0], dtype=bool)
    if val_maps is not None:
        if val_masks is None:
            raise ProbeInputError("val_maps given without val_masks; give both or neither")
        same_grid(shape, map_shape(val_maps, "val_maps"), "val")
        check_pair(val_maps.shape, val_masks, "val")
        select_maps, select_masks, train_rows = val_maps, val_masks, all_rows
        select_rows, selection = np.ones(len(val_masks), dtype=bool), "val"
    elif len(grid) > 1:
        select_rows = holdout_rows(shape[0], holdout, seed)
        select_maps, select_masks, train_rows, selection = train_maps, train_masks, ~select_rows, "holdout"
    else:
        selection = "none"
    best, best_head = 0, None
    if selection != "none":
        for i, point in enumerate(grid):
            head = fit.fit(train_maps, targets, train_rows, point["lr"], point["weight_decay"])
            scores = iou_from_counts(*fit.evaluate(head, select_maps, select_masks, select_rows))
            point.update(miou=scores["miou"], pixel_acc=scores["pixel_acc"])
            if best_head is None or _better(scores["miou"], grid[best]["miou"]):
                best, best_head = i, head
    chosen = {"lr": grid[best]["lr"], "weight_decay": grid[best]["weight_decay"], "selection": selection}
    if selection != "val":  # refit on all of train (with no choice to make: the only fit)
        best_head = fit.fit(train_maps, targets, all_rows, chosen["lr"], chosen["weight_decay"])
    inter, union, area = fit.evaluate(best_head, eval_maps, eval_masks, np.ones(len(eval_masks), dtype=bool))
    return SegmentResult(_metrics(inter, union, area), chosen, grid if selection != "none" else [], inter, union, area)


def _better(score: float, best: float) -> bool:
    """A higher mIoU wins; NaN (nothing to score) never beats a number; ties keep the first."""
    return not np.isnan(score) and (np.isnan(best) or score > best)


def _metrics(inter: np.ndarray, union: np.ndarray, area: np.ndarray) -> dict[str, Any]:
    scores = iou_from_counts(inter, union, area)
    per_class = [None if np.isnan(v) else float(v) for v in scores["iou"]]
    return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "mean_acc": scores["mean_acc"],
            "per_class_iou": per_class, "n": int(len(inter))}


class _Fitter:
    """One configuration of the protocol (classes, schedule, device, seed) fitting and scoring heads."""

    def __init__(self, num_classes: int, ignore_index: int | None, epochs: int, batch_size: int,
                 label_scale: int | None, device: str, seed: int) -> None:
        if label_scale is not None and int(label_scale) < 1:
            raise ProbeInputError(f"label_scale must be a positive integer or None (full resolution), "
                                  f"got {label_scale}")
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.epochs, self.batch_size, self.label_scale = int(epochs), int(batch_size), label_scale
        self.device, self.seed = device, int(seed)

    def targets(self, masks: Sequence, shape: tuple[int, ...]) -> Any:
        """Training labels: one (n, s*h, s*w) tensor of nearest-resized masks (int16 while the classes fit,
        a quarter of int64's memory), or each mask as an int64 tensor; ignored pixels become -100."""
        size = None if self.label_scale is None else (shape[1] * self.label_scale, shape[2] * self.label_scale)
        out = []
        for i in range(len(masks)):
            mask = self._mask(masks[i], i)
            if size is not None:
                mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
            out.append(mask if self.ignore_index is None else mask.masked_fill(mask == self.ignore_index, NO_IGNORE))
        if size is None:
            return out
        return torch.stack(out).to(torch.int16 if self.num_classes < 2**15 else torch.int64)

    def _mask(self, mask: Any, i: int) -> torch.Tensor:
        mask = torch.as_tensor(np.asarray(mask)).long()
        if mask.ndim != 2:
            raise ProbeInputError(f"mask {i} must be 2-D (H, W), got shape {tuple(mask.shape)}")
        labelled = mask if self.ignore_index is None else mask[mask != self.ignore_index]
        if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= self.num_classes):
            raise ProbeInputError(f"mask {i} holds values outside 0..{self.num_classes - 1} other than the ignore "
                                  f"index {self.ignore_index}; check num_classes and ignore_index")
        return mask

    def fit(self, maps: Any, targets: Any, rows: np.ndarray, lr: float, weight_decay: float) -> LinearSegHead:
        """A head trained on the ``rows`` of ``maps`` (a boolean mask) for the schedule's epochs."""
        n, _, _, dim = map_shape(maps, "train_maps")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = LinearSegHead(dim, self.num_classes).to(self.device)
        parts = [(a, b) for a, b in blocks(n, self.batch_size) if rows[a:b].any()]
        order = epoch_blocks(parts, self.epochs, self.seed)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = warmup_linear_decay(optimizer, len(order))
        head.train()
        for start, stop in order:
            keep = torch.from_numpy(np.flatnonzero(rows[start:stop]))
            logits = head(read_block(maps, start, stop, self.device)[keep.to(self.device)])
            loss = self._loss(logits, targets, start + keep.numpy())
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
                optimizer.step()
            schedule.step()
        return head.eval()

    def _loss(self, logits: torch.Tensor, targets: Any, rows: np.ndarray) -> torch.Tensor | None:
        """Mean cross-entropy over the labelled pixels of the batch (None when every pixel is ignored)."""
        if isinstance(targets, torch.Tensor):
            labels = [targets[torch.from_numpy(rows)].to(self.device).long()]
            outputs = [F.interpolate(logits, size=labels[0].shape[-2:], mode="bilinear", align_corners=False)]
        else:
            labels = [targets[r].to(self.device)[None] for r in rows]
            outputs = [F.interpolate(logits[j : j + 1], size=label.shape[-2:], mode="bilinear", align_corners=False)
                       for j, label in enumerate(labels)]
        total = sum(F.cross_entropy(out, label, ignore_index=NO_IGNORE, reduction="sum")
                    for out, label in zip(outputs, labels))
        count = sum(int((label != NO_IGNORE).sum()) for label in labels)
        return total / count if count else None

    @torch.no_grad()
    def evaluate(self, head: LinearSegHead, maps: Any, masks: Sequence,
                 rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image (intersection, union, label_area), each (rows, C) int64, at each mask's full resolution."""
        found = []
        for start, stop in blocks(len(masks), self.batch_size):
            if not rows[start:stop].any():
                continue
            logits = head(read_block(maps, start, stop, self.device))
            for j in np.flatnonzero(rows[start:stop]):
                mask = self._mask(masks[start + j], start + j)
                up = F.interpolate(logits[j : j + 1], size=tuple(mask.shape), mode="bilinear", align_corners=False)
                found.append(counts(confusion(up[0].argmax(0), mask.to(self.device), self.num_classes,
                                              self.ignore_index)))
        return tuple(np.stack([f[k] for f in found]) for k in range(3))  # type: ignore[return-value]
