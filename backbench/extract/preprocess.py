"""Preprocessing as data: what turns an image into a backbone's input.

Workers only decode, resize and crop to ``uint8``; normalization happens on the device
(:meth:`Preprocess.normalize`), so a batch crosses to the GPU at a quarter of the bytes.

Two ways to fit an image to the input size: ``resize="crop"`` (the model's own evaluation
transform: resize the short side, center-crop) and ``resize="full"`` (the whole image resized
to the input size, aspect ratio not kept), which feature maps use so that a map position maps
back to the original image by scaling alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
RESIZES = ("crop", "full")


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``floor(size / crop_pct)``, center-crop, normalize; or with
    ``resize="full"`` resize the whole image to the input size (no crop), normalize."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            object.__setattr__(self, "interpolation", "bicubic")
        if self.resize not in RESIZES:
            raise ValueError(f"resize {self.resize!r}: use crop or full")

    @classmethod
    def from_timm(cls, data_config: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=tuple(int(v) for v in data_config["input_size"]),
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
            interpolation=str(data_config.get("interpolation", "bicubic")),
            crop_pct=float(data_config.get("crop_pct", 0.875)),
        )

    def to_dict(self) -> dict[str, Any]:
        """As JSON; ``resize`` only when "full", so the records (and cache keys) of cropped
        groups are what they were before maps existed."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["resize"] == "crop":
            del d["resize"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=tuple(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d["interpolation"],
            crop_pct=float(d["crop_pct"]),
            resize=str(d.get("resize", "crop")),
        )

    @property
    def size(self) -> tuple[int, int]:
        return int(self.input_size[1]), int(self.input_size[2])

    @property
    def resize_to(self) -> int:
        """The short side before the center crop: ``floor(min(size) / crop_pct)``."""
        return math.floor(min(self.size) / self.crop_pct)

    def to_uint8(self):
        """A picklable transform PIL image -> ``uint8`` CHW tensor (runs in workers)."""
        from torchvision.transforms import v2

        return v2.Compose([v2.PILToTensor(), self.resize_crop()])

    def resize_crop(self):
        """Resize and center-crop (``resize="full"``: resize the whole image to the input size) a
        ``uint8`` CHW/NCHW tensor on any device."""
        from torchvision.transforms import v2

        interp = v2.InterpolationMode(self.interpolation)
        if self.resize == "full":
            return v2.Resize(self.size, interpolation=interp, antialias=True)
        return v2.Compose([v2.Resize(self.resize_to, interpolation=interp, antialias=True),
                           v2.CenterCrop(self.size)])

    def normalize(self, x):
        """``uint8`` NCHW on any device -> normalized float32 in the same layout."""
        import torch

        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * 255.0
        return (x.float() - mean) / std
