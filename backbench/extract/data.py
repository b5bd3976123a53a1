"""Data sources: ``imagefolder:PATH``, ``csv:PATH`` and the bundled ``digits``.

Every sample has a stable id (its relative path, or its index for digits), an integer
label, and the class names are kept. A source's fingerprint covers ids, labels and file
sizes, so a changed dataset never silently mixes with cached rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backbench.errors import DataSourceError, SampleError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageSource:
    """A labelled list of images. Subclasses fill ``ids``, ``labels``, ``classes``."""

    spec: str
    ids: list[str]
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int):
        """The image at ``index`` as an RGB PIL image; :class:`SampleError` if unreadable."""
        raise NotImplementedError

    def _fingerprint_extra(self) -> Any:
        return None

    @property
    def has_bytes(self) -> bool:
        """Whether :meth:`read_bytes` gives each sample's encoded file (for device decoding)."""
        return type(self).read_bytes is not ImageSource.read_bytes

    def read_bytes(self, index: int) -> bytes:
        """The encoded file of sample ``index``."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        payload = json.dumps(
            [self.spec.split(":")[0], self.ids, self.labels.tolist(), self.classes, self._fingerprint_extra()]
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"source": self.spec, "n": len(self), "classes": self.classes, "fingerprint": self.fingerprint()}


def _open_rgb(path: Path):
    """Decode any PIL image as RGB: first frame of animations, 16-bit scaled to 8-bit.

    Truncated or unidentifiable files and decompression bombs raise :class:`SampleError`.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except Exception as exc:
        raise SampleError(f"cannot decode image {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


class _FileSource(ImageSource):
    root: Path

    def load(self, index: int):
        return _open_rgb(self.root / self.ids[index])

    def read_bytes(self, index: int) -> bytes:
        path = self.root / self.ids[index]
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SampleError(f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from exc

    _sizes: dict[str, int] | None = None  # file sizes seen while listing (saves a stat per file)

    def _fingerprint_extra(self) -> Any:
        sizes, root = self._sizes or {}, str(self.root)
        return [sizes[i] if i in sizes else _size(os.path.join(root, i)) for i in self.ids]


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _list_images(folder: str, prefix: str) -> dict[str, int]:
    """{relative posix path: size} of the image files under ``folder``, recursively (os.scandir:
    one stat per file, no pathlib objects; an ImageNet-size folder lists in seconds)."""
    out: dict[str, int] = {}
    stack = [(folder, prefix)]
    while stack:
        here, rel = stack.pop()
        with os.scandir(here) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, f"{rel}/{e.name}"))
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                    out[f"{rel}/{e.name}"] = e.stat().st_size
    return out


class ImageFolder(_FileSource):
    """``PATH/<class>/<image>``: one folder per class, sorted by name."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).expanduser()
        self.spec = f"imagefolder:{self.root}"
        if not self.root.exists():
            raise DataSourceError(f"dataset folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise DataSourceError(f"dataset path {str(self.root)!r} is a file; imagefolder: wants a folder of class folders")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataSourceError(f"{str(self.root)!r} holds no class folders; expected PATH/<class>/<image>")
        ids, labels, self._sizes = [], [], {}
        for label, name in enumerate(self.classes):
            found = _list_images(str(self.root / name), name)
            self._sizes.update(found)
            files = sorted(found)
            if not files:
                raise DataSourceError(f"class folder {str(self.root / name)!r} holds no images; remove it or add images")
            ids += files
            labels += [label] * len(files)
        self.ids, self.labels = ids, np.asarray(labels, dtype=np.int64)


class CsvSource(_FileSource):
    """A CSV with columns ``path,label``; paths relative to the CSV's folder."""

    def __init__(self, path: str | Path) -> None:
        file = Path(path).expanduser()
        self.spec, self.root = f"csv:{file}", file.parent
        if not file.is_file():
            raise DataSourceError(f"CSV file {str(file)!r} does not exist")
        with open(file, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "label"} - set(reader.fieldnames or [])
            if missing:
                raise DataSourceError(
                    f"{str(file)!r} lacks column(s) {', '.join(sorted(missing))}; expected a header 'path,label'"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
                    raise DataSourceError(f"{str(file)!r} line {line}: empty path or label")
                rows.append((row["path"].strip(), row["label"].strip()))
        if not rows:
            raise DataSourceError(f"{str(file)!r} lists no images")
        names = {lab for _, lab in rows}
        numeric = all(n.lstrip("-").isdigit() for n in names)
        self.classes = sorted(names, key=(lambda n: int(n)) if numeric else None)
        index = {n: i for i, n in enumerate(self.classes)}
        self.ids = [p for p, _ in rows]
        self.labels = np.asarray([index[lab] for _, lab in rows], dtype=np.int64)


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
        from PIL import Image

        from PIL import ImageFilter

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
        yy, xx = np.mgrid[0:64, 0:64] / 64.0
        freq, phase, angle = rng.uniform(2, 10), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        if kind == "stripes":
            g = np.sin(2 * np.pi * freq * u + phase)
        elif kind == "checkers":
            g = np.sign(np.sin(2 * np.pi * freq * xx) * np.sin(2 * np.pi * freq * yy + phase))
        elif kind == "rings":
            cx, cy = rng.uniform(0.2, 0.8, 2)
            g = np.sin(2 * np.pi * freq * np.hypot(xx - cx, yy - cy) + phase)
        elif kind == "blobs":
            g = sum(np.exp(-((xx - a) ** 2 + (yy - b) ** 2) / rng.uniform(0.002, 0.02))
                    for a, b in rng.uniform(0, 1, (6, 2)))
        else:
            g = rng.normal(size=xx.shape)
        g = (g - g.min()) / (np.ptp(g) + 1e-9)
        color = rng.uniform(0.2, 1.0, 3)
        rgb = (g[..., None] * color * 255).astype(np.uint8)
        return Image.fromarray(rgb, mode="RGB")


SOURCE_KINDS: dict[str, Callable[[str, str], ImageSource]] = {
    "imagefolder": lambda arg, split: ImageFolder(arg),
    "csv": lambda arg, split: CsvSource(arg),
    "digits": lambda arg, split: Digits(split),
    "textures": lambda arg, split: Textures(split),
}
BUILTIN = ("digits", "textures")


def open_source(spec: str, split: str) -> ImageSource:
    """Open a data source from ``KIND:ARG`` (built-in ``digits`` and ``textures`` need none)."""
    kind, _, arg = spec.partition(":")
    factory = SOURCE_KINDS.get(kind)
    if factory is None:
        raise DataSourceError(
            f"unknown data source {kind!r} in {spec!r}; use one of "
            + ", ".join(f"{k}:PATH" if k not in BUILTIN else k for k in SOURCE_KINDS)
        )
    if kind not in BUILTIN and not arg:
        raise DataSourceError(f"data source {kind}: needs a path, e.g. {kind}:/data/train")
    return factory(arg, split)
