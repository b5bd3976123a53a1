"""What every data source shares: the :class:`ImageSource` interface, decoding to RGB, and
the file-backed base that ``imagefolder:`` and ``csv:`` sources build on.

Every sample has a stable id (its relative path, or its index for digits), an integer
label, and the class names are kept. A source's fingerprint covers ids, labels and file
sizes, so a changed dataset never silently mixes with cached rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from backbench.errors import DataSourceError, SampleError


class ImageSource:
    """A labelled list of images. Subclasses fill ``spec``, ``ids``, ``labels``, ``classes``.

    A dense source (``dense`` not empty) also labels pixels or objects: ``mask`` gives a
    class index per pixel (``ignore_index`` where unlabelled), ``boxes`` the objects of an
    image in its own pixels; both at the original image's resolution, whose ``image_size`` is
    known. Its ``classes`` are the mask values (or box categories); its ``labels`` are zeros.
    """

    multilabel = False  # True: ``labels`` are bitmasks over ``classes`` (see CsvSource)
    dense: frozenset[str] = frozenset()  # {"mask"}, {"boxes"} or both (see backbench.extract.datasets.dense)
    ignore_index: int | None = None  # the mask value that is not scored

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

    def mask(self, index: int) -> np.ndarray:
        """The (H, W) int64 class index of every pixel of image ``index``, at its full resolution."""
        raise DataSourceError(f"{self.spec} has no segmentation masks; use a dense source with masks "
                              f"(segfolder:, voc:, ade20k:, shapes)")

    def boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The objects of image ``index``: (M, 4) float32 x1, y1, x2, y2 in its pixels, (M,) int64 classes."""
        raise DataSourceError(f"{self.spec} has no object boxes; use a dense source with boxes (coco:, shapes)")

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of image ``index`` as stored (before any preprocessing)."""
        width, height = self.load(index).size
        return height, width

    def fingerprint(self) -> str:
        """A hash of the source kind, ids, labels, classes and what else changes the samples."""
        payload = json.dumps(
            [self.spec.split(":")[0], self.ids, self.labels.tolist(), self.classes, self._fingerprint_extra()]
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        out = {"source": self.spec, "n": len(self), "classes": self.classes, "fingerprint": self.fingerprint()}
        if self.dense:
            out.update(dense=sorted(self.dense), ignore_index=self.ignore_index)
        return out


def open_rgb(path: Path | Any, name: str | None = None):
    """Decode any PIL image as RGB: first frame of animations, 16-bit scaled to 8-bit.

    ``path`` may also be a binary file object (an image held in memory), then ``name`` says
    which sample it is in errors. Truncated or unidentifiable files and decompression bombs
    raise :class:`SampleError`.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
    except Exception as exc:
        raise SampleError(f"cannot decode image {name or str(path)!r}: {type(exc).__name__}: {exc}") from exc


def open_rgb_bytes(data: bytes, name: str):
    """:func:`open_rgb` of an encoded image held in memory (``name`` is the sample's id)."""
    import io

    return open_rgb(io.BytesIO(data), name)


def to_rgb(img):
    """A decoded PIL image as RGB; 16-bit and float modes are scaled to 8-bit first."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (for errors that quote a library's)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def file_size(path: str) -> int:
    """The size of ``path`` in bytes, -1 when it cannot be read (so a fingerprint still forms)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


class FileSource(ImageSource):
    """Samples that are image files under ``root``; their ids are paths relative to it."""

    root: Path
    _sizes: dict[str, int] | None = None  # file sizes seen while listing (saves a stat per file)

    def load(self, index: int):
        return open_rgb(self.root / self.ids[index])

    def read_bytes(self, index: int) -> bytes:
        path = self.root / self.ids[index]
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SampleError(f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from exc

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) from the file's header alone (nothing is decoded)."""
        from PIL import Image

        path = self.root / self.ids[index]
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception as exc:
            raise SampleError(f"cannot read the size of image {str(path)!r}: {one_line(exc)}") from exc
        return height, width

    def _fingerprint_extra(self) -> Any:
        sizes, root = self._sizes or {}, str(self.root)
        return [sizes[i] if i in sizes else file_size(os.path.join(root, i)) for i in self.ids]
