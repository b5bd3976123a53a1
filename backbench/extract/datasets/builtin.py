"""The built-in sets that need no files: ``cifar10-mini`` (1,500 real CIFAR-10 photos shipped
with the package, with a corrupted test split), ``digits`` (scikit-learn's bundled digits, with a
shifted test split) and ``textures`` (generated far-OOD images). All are reproducible."""

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


class Cifar10Mini(ImageSource):
    """1,500 CIFAR-10 photos (32x32) shipped in the package: 100 ``train`` and 50 ``test``
    images per class, carved from the CIFAR-10 training images (source, licence and how it was
    made: ``data/CIFAR10-MINI.md`` beside this module; ``tools/make_cifar10_mini.py`` rebuilds it).
    Samples come class by class in turn, so the first ``10 * k`` are ``k`` per class.

    ``shifted`` is the test split under a CIFAR-10-C-style corruption with the same classes
    (contrast lowered to 60 % and Gaussian noise of sd 0.02, seeded per image): the probe's
    distribution-shift test.
    """

    SPLITS = ("train", "test", "shifted")
    ARCHIVE = "cifar10-mini.zip"

    def __init__(self, split: str) -> None:
        if split not in self.SPLITS:
            raise DataSourceError(f"cifar10-mini has splits {', '.join(self.SPLITS)}, not {split!r}")
        files = _archive(self.ARCHIVE)
        folder = "test" if split == "shifted" else split
        # Classes interleaved (the first image of each class, then the second, ...), so that the
        # first N rows (a battle's `limit`) keep the classes balanced.
        per_class: dict[str, list[str]] = {}
        for n in sorted(n for n in files if n.startswith(folder + "/")):
            per_class.setdefault(n.split("/")[1], []).append(n)
        names = [n for row in zip(*per_class.values()) for n in row]
        self.spec = f"cifar10-mini:{split}"
        self.classes = sorted({n.split("/")[1] for n in files})
        self.ids = [n.split("/", 1)[1] for n in names]
        self.labels = np.array([self.classes.index(i.split("/")[0]) for i in self.ids], dtype=np.int64)
        self._files = {i: files[n] for i, n in zip(self.ids, names)}
        self._shifted = split == "shifted"

    def load(self, index: int):
        from PIL import Image

        from backbench.extract.datasets.base import open_rgb_bytes

        sample = self.ids[index]
        img = open_rgb_bytes(self._files[sample], sample)
        if not self._shifted:
            return img
        x = np.asarray(img, dtype=np.float64) / 255.0
        seed = int(hashlib.sha256(f"shifted/{sample}".encode()).hexdigest()[:8], 16)
        x = (x - x.mean()) * 0.6 + x.mean() + np.random.default_rng(seed).normal(0.0, 0.02, x.shape)
        return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8), mode="RGB")

    def _fingerprint_extra(self) -> Any:
        digest = hashlib.sha256()
        for sample in self.ids:
            digest.update(self._files[sample])
        return [digest.hexdigest(), self._shifted]


def _archive(name: str) -> dict[str, bytes]:
    """Every file of a zip shipped in ``data/`` as ``{name: bytes}`` (read whole: a few MB)."""
    import zipfile
    from importlib.resources import files

    with files("backbench.extract.datasets").joinpath("data", name).open("rb") as fh:
        with zipfile.ZipFile(fh) as zf:
            return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}


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


def open_cifar10_mini(arg: str, split: str) -> Cifar10Mini:
    """The registry's opener (``cifar10-mini`` takes no argument)."""
    return Cifar10Mini(split)


def open_digits(arg: str, split: str) -> Digits:
    """The registry's opener (``digits`` takes no argument)."""
    return Digits(split)


def open_textures(arg: str, split: str) -> Textures:
    """The registry's opener (``textures`` takes no argument)."""
    return Textures(split)
