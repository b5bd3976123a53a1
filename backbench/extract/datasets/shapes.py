"""``shapes``: a generated dense set (no files): coloured discs, squares and triangles on
textured noise, 64x64, with a mask (background 0, shapes 1..3) and a box per shape.

Splits ``train`` (200), ``val`` (50) and ``test`` (100), each reproducible from its name (as
``textures``). :func:`write_shapes` writes the same kind of data as files (JPEG images, palette
PNG masks, a COCO annotation file, a captions file) for the ``segfolder:``, ``coco:`` and
``captions:`` sources.

Each image also has a caption saying what it shows (:func:`shapes_caption`: how many shapes, and
each one's size, colour, kind and place), so ``shapes`` is a captioned set too: image-text
retrieval (``backbench retrieve --text``) runs on it offline. The captions are a fixed function
of the samples, which the fingerprint already covers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from backbench.errors import DataSourceError
from backbench.extract.datasets.base import ImageSource

CLASSES = ("background", "disc", "square", "triangle")
SIZE = 64
IGNORE = 255


def shapes_sample(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sample drawn from ``key``: image (64, 64, 3) uint8, mask (64, 64) int64, boxes (M, 4)
    float32 (x1, y1, x2, y2: the tight box of the shape's pixels) and their classes (M,) int64.

    One to three shapes, none touching another, so each box holds its shape alone.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    coarse = Image.fromarray(rng.integers(40, 200, (6, 6, 3), dtype=np.uint8), mode="RGB")
    image = np.asarray(coarse.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float64)
    image = image + rng.normal(0.0, 18.0, image.shape)
    mask = np.zeros((SIZE, SIZE), dtype=np.int64)
    taken = np.zeros((SIZE, SIZE), dtype=bool)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 4))):
        label, side = int(rng.integers(1, 4)), int(rng.integers(14, 27))
        spot = _free_spot(rng, taken, side)
        if spot is None:
            continue  # no room left beside the shapes drawn before
        x0, y0 = spot
        color = rng.uniform(0, 255, 3)
        color[rng.integers(0, 3)] = rng.choice([15.0, 240.0])  # one channel saturated: stands out of the noise
        canvas = Image.new("L", (SIZE, SIZE), 0)
        draw, corner = ImageDraw.Draw(canvas), (x0 + side - 1, y0 + side - 1)
        if label == 1:
            draw.ellipse([x0, y0, *corner], fill=1)
        elif label == 2:
            draw.rectangle([x0, y0, *corner], fill=1)
        else:
            draw.polygon([(x0 + (side - 1) / 2, y0), (x0, y0 + side - 1), corner], fill=1)
        pixels = np.asarray(canvas, dtype=bool)
        ys, xs = np.nonzero(pixels)
        taken |= pixels
        mask[pixels] = label
        image[pixels] = color + rng.normal(0.0, 8.0, (len(ys), 3))
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(label)
    rgb = np.clip(image, 0, 255).round().astype(np.uint8)
    return rgb, mask, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


# colour names and the sRGB point each stands for: a shape's mean colour takes the nearest name
COLOURS = {"black": (20, 20, 20), "white": (240, 240, 240), "grey": (128, 128, 128), "red": (220, 30, 30),
           "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 225, 40), "cyan": (40, 215, 225),
           "magenta": (215, 40, 205), "orange": (240, 140, 20), "purple": (120, 40, 170), "pink": (240, 150, 190),
           "brown": (130, 80, 30), "olive": (128, 128, 20), "teal": (20, 128, 128), "navy": (20, 20, 120)}
COUNTS = ("no shapes", "one shape", "two shapes", "three shapes")


def colour_name(rgb: np.ndarray) -> str:
    """The name in :data:`COLOURS` nearest to an (r, g, b) colour."""
    names = list(COLOURS)
    points = np.asarray([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((points - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


def _place(box: np.ndarray) -> str:
    """Where a box's centre lies in a 3x3 grid of the image: "top left", "top", ..., "centre"."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = ("top", "", "bottom")[min(2, int(3 * cy / SIZE))]
    col = ("left", "", "right")[min(2, int(3 * cx / SIZE))]
    return f"{row} {col}".strip() or "centre"


def shapes_caption(rgb: np.ndarray, mask: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> str:
    """A sentence describing a sample: the count, then each shape (left to right) by its size
    (small: under 20 px wide), colour (the name nearest its pixels' mean), kind and place, e.g.
    "two shapes: a large red disc at the top left and a small blue triangle at the bottom"."""
    parts = []
    for i in np.argsort(boxes[:, 0], kind="stable") if len(boxes) else []:
        x1, y1, x2, y2 = (int(v) for v in boxes[i])
        pixels = mask[y1:y2, x1:x2] == labels[i]
        colour = colour_name(rgb[y1:y2, x1:x2][pixels].mean(axis=0))
        size = "small" if x2 - x1 < 20 else "large"
        parts.append(f"a {size} {colour} {CLASSES[int(labels[i])]} at the {_place(boxes[i])}")
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + (parts[-1] if parts else "")
    return f"{COUNTS[len(parts)]}: {listed}" if parts else COUNTS[0]


def _free_spot(rng: np.random.Generator, taken: np.ndarray, side: int, tries: int = 8) -> tuple[int, int] | None:
    """A top-left corner whose ``side``-square, with a 2-pixel margin, misses every ``taken`` pixel."""
    for _ in range(tries):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
        if not taken[max(y0 - 2, 0):y0 + side + 2, max(x0 - 2, 0):x0 + side + 2].any():
            return x0, y0
    return None


class Shapes(ImageSource):
    """``shapes``: generated shapes with masks and boxes; ``classes`` are background and the
    three shapes (mask value k, box label k: boxes are labelled 1..3, never 0)."""

    SPLITS = {"train": 200, "val": 50, "test": 100}
    dense = frozenset({"mask", "boxes"})
    ignore_index = IGNORE  # never present: every pixel is labelled

    def __init__(self, split: str, seed: int = 0) -> None:
        if split not in self.SPLITS:
            raise DataSourceError(f"shapes has splits {', '.join(self.SPLITS)}, not {split!r}")
        self.spec, self.split, self.seed = f"shapes:{split}", split, seed
        self.classes = list(CLASSES)
        self.ids = [f"{i:03d}" for i in range(self.SPLITS[split])]
        self.labels = np.zeros(len(self.ids), dtype=np.int64)

    def _sample(self, index: int):
        return shapes_sample(f"{self.seed}/{self.split}/{int(self.ids[index])}")

    def load(self, index: int):
        from PIL import Image

        return Image.fromarray(self._sample(index)[0], mode="RGB")

    def mask(self, index: int) -> np.ndarray:
        return self._sample(index)[1]

    def boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._sample(index)[2:]

    def image_size(self, index: int) -> tuple[int, int]:
        return SIZE, SIZE

    @property
    def captions(self) -> list[list[str]]:
        """One caption per image (:func:`shapes_caption`), as captioned sources give them."""
        return [[shapes_caption(*self._sample(i))] for i in range(len(self.ids))]

    def _fingerprint_extra(self) -> Any:
        return [self.split, self.seed]


def write_shapes(root: str | Path, split: str = "train", n: int = 20, seed: int = 0) -> Path:
    """Write ``n`` shapes samples as files under ``root``: ``images/NNN.jpg``, ``masks/NNN.png``
    (palette PNGs, the index is the class), ``classes.txt`` beside the masks,
    ``annotations.json`` (COCO instances: categories 1..3 are disc, square, triangle) and
    ``captions.jsonl`` (one ``{"image": "images/NNN.jpg", "caption": ...}`` a line).

    Sample i is the one ``Shapes(split, seed)`` gives at i (``seed=0``: the built-in ``shapes``),
    then JPEG-compressed. ``segfolder:ROOT/images:ROOT/masks``,
    ``coco:ROOT/images:ROOT/annotations.json`` and ``captions:ROOT/captions.jsonl`` read it back.
    Returns ``root``.
    """
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    palette = [0, 0, 0, 220, 40, 40, 40, 180, 40, 40, 80, 220] + [0, 0, 0] * 252
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": [
        {"id": k, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES) if k]}
    captions = []
    for i in range(n):
        rgb, mask, boxes, labels = shapes_sample(f"{seed}/{split}/{i}")
        captions.append(json.dumps({"image": f"images/{i:03d}.jpg", "caption": shapes_caption(rgb, mask, boxes,
                                                                                            labels)}))
        Image.fromarray(rgb, mode="RGB").save(root / "images" / f"{i:03d}.jpg", quality=95)
        png = Image.frombytes("P", (SIZE, SIZE), mask.astype(np.uint8).tobytes())
        png.putpalette(palette)
        png.save(root / "masks" / f"{i:03d}.png")
        coco["images"].append({"id": i + 1, "file_name": f"{i:03d}.jpg", "width": SIZE, "height": SIZE})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            area = int((mask[int(y1):int(y2), int(x1):int(x2)] == label).sum())
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": label,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0})
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "annotations.json").write_text(json.dumps(coco))
    (root / "captions.jsonl").write_text("\n".join(captions) + "\n")
    return root


def open_shapes(arg: str, split: str) -> Shapes:
    """The registry's opener (``shapes`` takes no argument)."""
    return Shapes(split)
