"""Frozen-backbone detection probe on one cached feature map: a simple pyramid and an FCOS head.

This is a probe comparable across backbones, not a detector's benchmark number (Battle of the
Backbones fine-tunes Cascade Mask R-CNN end to end; here the backbone's cached map is frozen).
From the single map, ViTDet's simple feature pyramid (Li et al. 2022, detectron2's
``SimpleFeaturePyramid``) makes one level per scale: 4x by two stride-2 deconvolutions (LayerNorm
and GELU between), 2x by one, 1x as is, 0.5x by a stride-2 max-pool, each followed by a 1x1 and a
3x3 convolution to a common ``width``, each with a channel LayerNorm. Levels a map is too small
to pool to are left out. A channel LayerNorm first puts every backbone's features on one scale.
On the pyramid, torchvision's FCOS (``torchvision.models.detection.fcos``) does the rest: its
``FCOSHead`` and anchor generator (one anchor per cell, as large as the level's stride), and the
``compute_loss`` (focal, GIoU, centerness) and ``postprocess_detections`` of an ``FCOS``
instance, trained for a fixed schedule with AdamW (linear warmup, linear decay to 0).

The map covers the whole image resized to ``input_size`` (no crop), so boxes map between the
original image and the map by scaling alone. They are scaled to a frame of ``grid x stride``
pixels, ``stride`` the input's pixels per map cell rounded up to a multiple of the largest
upsampling (so every level's stride is a whole number, as the anchor generator needs; FCOS's
targets and losses are scale-free), and predictions are scaled back to original pixels for
COCO box AP. Heavy (torch, torchvision): task modules import it when they run.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from backbench.errors import ProbeInputError
from backbench.probe.dense_data import (blocks, check_pair, epoch_blocks, map_shape, read_block, same_grid,
                                        warmup_linear_decay)
from backbench.probe.dense_metrics import coco_box_eval

SCALES = (4.0, 2.0, 1.0, 0.5)  # ViTDet's pyramid from a stride-16 map: strides 4, 8, 16, 32


@dataclass(frozen=True)
class DetectResult:
    """COCO box AP on eval and, per eval image, its detections ``(boxes xyxy, scores, labels)`` in original pixels."""

    metrics: dict
    detections: list
    matches: dict = field(default_factory=dict)  # COCOeval's matching, for resampling (coco_matches)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (detectron2's ``LayerNorm`` for ViTDet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one (b, d, h, w) map: a level per scale, ``width`` channels each."""

    def __init__(self, dim: int, width: int, scales: Sequence[float]) -> None:
        super().__init__()
        self.out_channels = width
        self.norm = LayerNorm2d(dim)
        self.levels = nn.ModuleList(self._level(dim, width, float(s)) for s in scales)

    @staticmethod
    def _level(dim: int, width: int, scale: float) -> nn.Sequential:
        half, quarter = max(1, dim // 2), max(1, dim // 4)
        if scale == 4.0:
            layers, out = [nn.ConvTranspose2d(dim, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
                           nn.ConvTranspose2d(half, quarter, 2, stride=2)], quarter
        elif scale == 2.0:
            layers, out = [nn.ConvTranspose2d(dim, half, 2, stride=2)], half
        elif scale == 1.0:
            layers, out = [], dim
        elif scale == 0.5:
            layers, out = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
        else:
            raise ProbeInputError(f"pyramid scale {scale} is not one of ViTDet's 4, 2, 1, 0.5")
        return nn.Sequential(*layers, nn.Conv2d(out, width, 1, bias=False), LayerNorm2d(width),
                             nn.Conv2d(width, width, 3, padding=1, bias=False), LayerNorm2d(width))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.norm(x)
        return OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))


def pyramid_scales(h: int, w: int, scales: Sequence[float]) -> tuple[float, ...]:
    """The scales, finest first, that a (h, w) map supports: pooling must leave at least one cell."""
    kept = tuple(sorted({float(s) for s in scales if min(h, w) * float(s) >= 1}, reverse=True))
    if not kept:
        raise ProbeInputError(f"no pyramid level fits a {h}x{w} map with scales {tuple(scales)}; include 1.0")
    return kept


def detect_probe(train_maps, train_boxes: Sequence, eval_maps, eval_boxes: Sequence, *, num_classes: int,
                 input_size: Sequence[int], train_sizes: Any, eval_sizes: Any, lr: float = 1e-3,
                 weight_decay: float = 1e-4, epochs: int = 12, batch_size: int = 16, width: int = 128,
                 head_convs: int = 4, scales: Sequence[float] = SCALES, score_thresh: float = 0.05,
                 nms_thresh: float = 0.6, detections_per_img: int = 100, device: str = "cpu",
                 seed: int = 0) -> DetectResult:
    """Train the pyramid and FCOS head on train's maps and boxes; COCO box AP of its detections on eval.

    Maps are (n, h, w, d) array-likes read by row slices; boxes are per image ``((M, 4) xyxy,
    (M,) labels in 0..num_classes-1)`` in original pixels; sizes are (n, 2) original (H, W);
    ``input_size`` is the (H, W) the whole image was resized to for the map.
    """
    shape = map_shape(train_maps, "train_maps")
    same_grid(shape, map_shape(eval_maps, "eval_maps"), "eval")
    check_pair(shape, train_boxes, "train")
    check_pair(eval_maps.shape, eval_boxes, "eval")
    train_sizes, eval_sizes = _sizes(train_sizes, shape[0], "train_sizes"), _sizes(eval_sizes, len(eval_boxes),
                                                                                   "eval_sizes")
    if num_classes < 1 or width < 32 or width % 32:
        raise ProbeInputError(f"num_classes must be positive and width a multiple of 32 (FCOS's GroupNorm(32)), "
                              f"got {num_classes} and {width}")
    frame = _Frame(shape[1], shape[2], input_size, pyramid_scales(shape[1], shape[2], scales))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = _fcos(shape[3], num_classes, width, head_convs, frame, score_thresh, nms_thresh,
                      detections_per_img).to(device)
    targets = [frame.target(b, train_sizes[i], num_classes, i) for i, b in enumerate(train_boxes)]
    _train(model, frame, train_maps, targets, lr, weight_decay, epochs, batch_size, device, seed)
    found = _detect(model, frame, eval_maps, eval_sizes, batch_size, device)
    metrics, matches = coco_box_eval(eval_boxes, found, eval_sizes, num_classes)
    return DetectResult({**metrics, "n": int(len(eval_boxes))}, found, matches)


def _sizes(sizes: Any, n: int, what: str) -> np.ndarray:
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.shape != (n, 2) or not (sizes > 0).all():
        raise ProbeInputError(f"{what} must be ({n}, 2) positive image sizes (H, W), got shape {sizes.shape}")
    return sizes


class _Frame:
    """The probe's coordinate frame: (h*stride, w*stride) pixels over the whole image, and its levels."""

    def __init__(self, h: int, w: int, input_size: Sequence[int], scales: tuple[float, ...]) -> None:
        if len(input_size) != 2 or min(input_size) <= 0:
            raise ProbeInputError(f"input_size must be the (H, W) the images were resized to, got {input_size}")
        finest = max(scales)
        step = max(1, int(finest))
        self.stride = step * math.ceil(max(input_size[0] / h, input_size[1] / w) / step)
        self.size = (h * self.stride, w * self.stride)
        self.scales = scales
        self.level_strides = tuple(max(1, int(round(self.stride / s))) for s in scales)

    def scale(self, size: np.ndarray) -> np.ndarray:
        """Frame pixels per original pixel along x and y for an image of (H, W) ``size``, as (sx, sy, sx, sy)."""
        return np.array([self.size[1] / size[1], self.size[0] / size[0]] * 2)

    def target(self, boxes: Any, size: np.ndarray, num_classes: int, i: int) -> dict[str, torch.Tensor]:
        """FCOS's target of one image: its boxes in the frame (degenerate ones dropped) and labels."""
        xyxy, labels = boxes
        xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4) * self.scale(size)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(xyxy):
            raise ProbeInputError(f"train image {i}: {len(xyxy)} boxes but {len(labels)} labels; they must match")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ProbeInputError(f"train image {i}: box label outside 0..{num_classes - 1}; check num_classes")
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return {"boxes": torch.as_tensor(xyxy[keep], dtype=torch.float32), "labels": torch.as_tensor(labels[keep])}


def _fcos(dim: int, num_classes: int, width: int, head_convs: int, frame: _Frame, score_thresh: float,
          nms_thresh: float, detections_per_img: int):
    """An FCOS instance whose backbone is the simple pyramid; its transform is never used."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS, FCOSHead

    pyramid = SimplePyramid(dim, width, frame.scales)
    anchors = AnchorGenerator(tuple((s,) for s in frame.level_strides), ((1.0,),) * len(frame.scales))
    head = FCOSHead(width, 1, num_classes, num_convs=int(head_convs))
    return FCOS(pyramid, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
                nms_thresh=nms_thresh, detections_per_img=detections_per_img)


def _outputs(model, frame: _Frame, maps: torch.Tensor) -> tuple[dict, list, list[int]]:
    """The head's outputs, the anchors per image and the anchors per level of one batch of maps."""
    from torchvision.models.detection.image_list import ImageList

    features = list(model.backbone(maps).values())
    images = ImageList(maps.new_empty((len(maps), 0, *frame.size)), [frame.size] * len(maps))
    return model.head(features), model.anchor_generator(images, features), [f.shape[2] * f.shape[3] for f in features]


def _train(model, frame: _Frame, maps: Any, targets: list[dict], lr: float, weight_decay: float, epochs: int,
           batch_size: int, device: str, seed: int) -> None:
    order = epoch_blocks(blocks(len(targets), batch_size), epochs, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    schedule = warmup_linear_decay(optimizer, len(order))
    model.train()
    for start, stop in order:
        outputs, anchors, per_level = _outputs(model, frame, read_block(maps, start, stop, device))
        batch = [{k: v.to(device) for k, v in t.items()} for t in targets[start:stop]]
        losses = model.compute_loss(batch, outputs, anchors, per_level)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise ProbeInputError(f"the detection loss became {float(loss)} (lr {lr}); try a smaller lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


@torch.no_grad()
def _detect(model, frame: _Frame, maps: Any, sizes: np.ndarray, batch_size: int, device: str) -> list:
    """Per image ``(boxes, scores, labels)`` numpy arrays, boxes scaled back to original pixels."""
    found = []
    for start, stop in blocks(len(sizes), batch_size):
        outputs, anchors, per_level = _outputs(model, frame, read_block(maps, start, stop, device))
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        levels = [list(a.split(per_level)) for a in anchors]
        for i, det in enumerate(model.postprocess_detections(split, levels, [frame.size] * (stop - start))):
            boxes = det["boxes"].cpu().numpy().astype(np.float64) / frame.scale(sizes[start + i])
            found.append((boxes.astype(np.float32), det["scores"].cpu().numpy(), det["labels"].cpu().numpy()))
    return found
