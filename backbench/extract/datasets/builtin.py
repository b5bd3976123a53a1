"""The built-in sets that need no files: ``digits`` (scikit-learn's bundled digits, with a
shifted test split) and ``textures`` (generated far-OOD images). Both are reproducible."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from backbench.errors import DataSourceError
from backbench.extract.datasets.base import ImageSource


class Digits(ImageSource):
    """scikit-learn's bundled 8x8 digits, upscaled to 32x32, with a fixed seeded split.

    ``shifted`` is the test split under a distribution shift with the same classes
    (inverted contrast, rotated 20 degrees, blurred): an ImageNet-R-style test for the probe.
    """

    SPLITS = ("train", "test", "shifted")

    def __init__(self, split: str) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in self.SPLITS:
            raise DataSourceError(f"digits has splits {', '.join(self.SPLITS)}, not {split!r}")
        data = load_digits()
        train, test = train_test_split(
            np.arange(len(data.target)), test_size=0.3, stratify=data.target, random_state=0
        )
        self._index = np.sort(train if split == "train" else test)
        self._shifted = split == "shifted"
        self._images = data.images[self._index]
        self.spec = f"digits:{split}"
        self.ids = [str(i) for i in self._index]
        self.labels = data.target[self._index].astype(np.int64)
        self.classes = [str(c) for c in data.target_names]

    def load(self, index: int):
        from PIL import Image, ImageFilter

        pixels = np.clip(self._images[index] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR)
        if self._shifted:
            img = Image.fromarray(255 - np.asarray(img)).rotate(20, resample=Image.BILINEAR, fillcolor=255)
            img = img.filter(ImageFilter.GaussianBlur(1))
        return img.convert("RGB")

    def _fingerprint_extra(self) -> Any:
        return [hashlib.sha256(self._images[: len(self.ids)].tobytes()).hexdigest(), self._shifted]


class Textures(ImageSource):
    """Generated far-OOD images: stripes, checkers, rings, blobs and noise (no download).

    ``split`` seeds the generator, so every split is a different, reproducible set of 200.
    """

    KINDS = ("stripes", "checkers", "rings", "blobs", "noise")
    PER_CLASS = 40

    def __init__(self, split: str) -> None:
        self.spec, self.split = f"textures:{split}", split
        self.classes = list(self.KINDS)
        self.ids = [f"{k}/{i}" for k in self.KINDS for i in range(self.PER_CLASS)]
        self.labels = np.repeat(np.arange(len(self.KINDS)), self.PER_CLASS).astype(np.int64)

    def load(self, index: int):
        from PIL import Image

        kind, i = self.ids[index].split("/")
        seed = int(hashlib.sha256(f"{self.split}/{kind}/{i}".encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng(seed)
        g = _pattern(kind, rng)
        g = (g - g.min()) / (np.ptp(g) + 1e-9)
        color = rng.uniform(0.2, 1.0, 3)
        rgb = (g[..., None] * color * 255).astype(np.uint8)
        return Image.fromarray(rgb, mode="RGB")


def _pattern(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 64x64 grey pattern of one texture kind, drawn from ``rng`` (its draws fix the image)."""
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    freq, phase, angle = rng.uniform(2, 10), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == "stripes":
        return np.sin(2 * np.pi * freq * u + phase)
    if kind == "checkers":
        return np.sign(np.sin(2 * np.pi * freq * xx) * np.sin(2 * np.pi * freq * yy + phase))
    if kind == "rings":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        return np.sin(2 * np.pi * freq * np.hypot(xx - cx, yy - cy) + phase)
    if kind == "blobs":
        return sum(np.exp(-((xx - a) ** 2 + (yy - b) ** 2) / rng.uniform(0.002, 0.02))
                   for a, b in rng.uniform(0, 1, (6, 2)))
    return rng.normal(size=xx.shape)


def open_digits(arg: str, split: str) -> Digits:
    """The registry's opener (``digits`` takes no argument)."""
    return Digits(split)


def open_textures(arg: str, split: str) -> Textures:
    """The registry's opener (``textures`` takes no argument)."""
    return Textures(split)
