"""Dense sources: images whose pixels or objects are labelled, for the segmentation and
detection probes.

- ``segfolder:IMAGES:MASKS``: ``IMAGES/a.jpg`` paired with ``MASKS/a.png`` (sub-folders too),
  classes ``0..K-1`` unless a ``classes.txt`` in or beside MASKS names them, one per line.
- ``voc:ROOT``: Pascal VOC 2012 (``JPEGImages/``, ``SegmentationClass/``,
  ``ImageSets/Segmentation/SPLIT.txt``), its 21 classes.
- ``ade20k:ROOT``: ADEChallengeData2016 (``images/`` and ``annotations/``, each with
  ``training/`` and ``validation/``), its 150 classes.
- ``coco:IMAGES:ANNOTATIONS.json``: a COCO instances file; boxes only.

A mask is a PNG whose pixel values are class indices: a palette PNG's index (as VOC's
``SegmentationClass``) or a greyscale value, read with PIL as stored and never through RGB, at
its image's full resolution; 255 is not scored. Boxes are ``x1, y1, x2, y2`` in the original
image's pixels. A source's fingerprint covers its images' and masks' file sizes (as other file
sources do) and, for COCO, the boxes themselves.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from backbench.errors import DataSourceError, SampleError
from backbench.extract.datasets.base import FileSource, one_line
from backbench.extract.datasets.folder import list_images

IGNORE = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# ADE20K's 150 classes in mask order (mask value k + 1 is class k), as mmsegmentation names them.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B")


def read_mask(path: str | Path) -> np.ndarray:
    """A mask PNG's stored values as (H, W) int64: a palette image's indices, a greyscale's levels."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                values = np.asarray(img) if mode in MASK_MODES else None
    except Exception as exc:
        raise SampleError(f"cannot decode mask {str(path)!r}: {one_line(exc)}") from exc
    if values is None:
        raise SampleError(f"mask {str(path)!r} is a {mode} image; a mask holds one class index per pixel: save it "
                          f"as a palette (P) or greyscale (L) PNG, not colours")
    return values.astype(np.int64)


def _listing(folder: Path, what: str) -> dict[str, int]:
    """{path relative to ``folder``: size} of its image files, recursively."""
    if not folder.is_dir():
        raise DataSourceError(f"{what} folder {str(folder)!r} does not exist")
    return {path[2:]: size for path, size in list_images(str(folder), ".").items()}


def _refuse_missing(missing: list[tuple[str, Path]], total: int, what: str, fix: str) -> None:
    """One line for the images whose ``what`` (mask, file) is absent, naming the first."""
    if missing:
        sample, wanted = missing[0]
        raise DataSourceError(f"{len(missing)} of {total} images have no {what}: {sample!r} wants "
                              f"{str(wanted)!r}, which does not exist; {fix}")


class MaskSource(FileSource):
    """Images under ``root``, each with one mask PNG (``_masks``: id -> path).

    ``reduce_zero_label``: mask value 0 is "other" and not scored, values ``1..K`` are classes
    ``0..K-1`` (mmsegmentation's ``reduce_zero_label``, as ADE20K needs).
    """

    dense = frozenset({"mask"})
    ignore_index = IGNORE
    reduce_zero_label = False
    _masks: dict[str, str]
    _mask_sizes: dict[str, int]
    _fix_values = "fix the mask"

    def _pair(self, images: dict[str, int], masks: dict[str, int], mask_root: Path, prefix: str = "") -> None:
        """Fill ``ids`` (``prefix`` + the image's path), ``labels`` and the mask of each image:
        the mask of ``a/b.jpg`` is ``mask_root/a/b.png``."""
        self.ids, self._sizes, self._masks, self._mask_sizes = [], {}, {}, {}
        missing, seen = [], {}
        for rel in sorted(images):
            sample, mask = prefix + rel, posixpath.splitext(rel)[0] + ".png"
            if mask in seen:
                raise DataSourceError(f"images {seen[mask]!r} and {sample!r} share the mask "
                                      f"{str(mask_root / mask)!r}; keep one image per name")
            seen[mask] = sample
            if mask not in masks:
                missing.append((sample, mask_root / mask))
                continue
            self.ids.append(sample)
            self._sizes[sample], self._mask_sizes[sample] = images[rel], masks[mask]
            self._masks[sample] = str(mask_root / mask)
        _refuse_missing(missing, len(images), "mask", "add the masks, or move those images out")
        self.labels = np.zeros(len(self.ids), dtype=np.int64)

    def mask(self, index: int) -> np.ndarray:
        sample = self.ids[index]
        path = self._masks[sample]
        raw = read_mask(path)
        height, width = self.image_size(index)
        if raw.shape != (height, width):
            raise SampleError(f"mask {path!r} is {raw.shape[1]}x{raw.shape[0]} but its image {sample!r} is "
                              f"{width}x{height}; a mask labels its image pixel for pixel")
        values = np.where((raw == 0) | (raw == IGNORE), IGNORE, raw - 1) if self.reduce_zero_label else raw
        bad = (values != IGNORE) & ((values < 0) | (values >= len(self.classes)))
        if bad.any():
            first = int(raw[bad].flat[0])
            low = 1 if self.reduce_zero_label else 0
            raise SampleError(f"mask {path!r} holds the value {first}, but {self.spec} has {len(self.classes)} "
                              f"classes (values {low}..{low + len(self.classes) - 1}, {IGNORE} unlabelled); "
                              f"{self._fix_values}")
        return values

    def _fingerprint_extra(self) -> Any:
        masks = [self._mask_sizes[i] for i in self.ids]
        return [super()._fingerprint_extra(), masks, self.ignore_index, self.reduce_zero_label]


class SegFolder(MaskSource):
    """``segfolder:IMAGES:MASKS``: ``IMAGES/x/a.jpg`` is labelled by ``MASKS/x/a.png``.

    The classes are the lines of ``MASKS/classes.txt`` (or of ``classes.txt`` beside MASKS);
    without one they are ``0..K-1``, K one more than the largest value in any mask (found by
    reading every mask once, when first asked).
    """

    _fix_values = "fix the mask, or name every class in classes.txt"

    def __init__(self, images: str | Path, masks: str | Path) -> None:
        self.root, self.mask_root = Path(images).expanduser(), Path(masks).expanduser()
        self.spec = f"segfolder:{self.root}:{self.mask_root}"
        found = _listing(self.root, "image")
        inner = posixpath.relpath(self.mask_root.resolve().as_posix(), self.root.resolve().as_posix())
        found = {p: s for p, s in found.items() if not p.startswith(inner + "/")}  # MASKS inside IMAGES
        if not found:
            raise DataSourceError(f"{str(self.root)!r} holds no images; segfolder: pairs IMAGES/a.jpg with MASKS/a.png")
        self._pair(found, _listing(self.mask_root, "mask"), self.mask_root)
        self._names = _class_names(self.mask_root)

    @cached_property
    def classes(self) -> list[str]:
        if self._names is not None:
            return self._names
        top = max((int(m[m != IGNORE].max(initial=-1)) for m in map(read_mask, self._masks.values())), default=-1)
        return [str(k) for k in range(max(top + 1, 1))]


def _class_names(mask_root: Path) -> list[str] | None:
    """The lines of ``classes.txt`` in MASKS (else beside it), or None when there is none."""
    for path in (mask_root / "classes.txt", mask_root.parent / "classes.txt"):
        if path.is_file():
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            while names and not names[-1]:
                names.pop()
            if not names or "" in names:
                line = names.index("") + 1 if "" in names else 1
                raise DataSourceError(f"{str(path)!r} line {line} is empty; name one class per line, in mask order")
            if len(names) > IGNORE:
                raise DataSourceError(f"{str(path)!r} names {len(names)} classes; at most {IGNORE} fit beside the "
                                      f"ignore value {IGNORE}")
            return names
    return None


class VocSegmentation(MaskSource):
    """``voc:ROOT``: Pascal VOC 2012 segmentation; split names are the files of
    ``ImageSets/Segmentation`` (train, val, trainval). ROOT is ``VOCdevkit/VOC2012`` (or above it)."""

    classes = list(VOC_CLASSES)

    def __init__(self, root: str | Path, split: str) -> None:
        given = Path(root).expanduser()
        found = [p for p in (given, given / "VOC2012", given / "VOCdevkit" / "VOC2012")
                 if (p / "ImageSets" / "Segmentation").is_dir()]
        if not found:
            raise DataSourceError(f"{str(given)!r} is not a Pascal VOC 2012 folder (no ImageSets/Segmentation/); "
                                  f"point voc: at VOCdevkit/VOC2012")
        self.root = found[0]
        self.spec = f"voc:{self.root}"
        lists = self.root / "ImageSets" / "Segmentation"
        splits = sorted(p.stem for p in lists.glob("*.txt"))
        if split not in splits:
            raise DataSourceError(f"voc: has splits {', '.join(splits) or '(none)'} in {str(lists)!r}, not {split!r}")
        stems = [s for s in (line.strip() for line in (lists / f"{split}.txt").read_text().splitlines()) if s]
        images = _listing(self.root / "JPEGImages", "image")
        listed = {f"{s}.jpg": images.get(f"{s}.jpg", -1) for s in stems}
        absent = [(f"JPEGImages/{name}", self.root / "JPEGImages" / name) for name, size in listed.items() if size < 0]
        _refuse_missing(absent, len(listed), "file", f"the {split} list names images that JPEGImages/ lacks")
        masks = self.root / "SegmentationClass"
        self._pair(listed, _listing(masks, "mask"), masks, prefix="JPEGImages/")


class Ade20k(MaskSource):
    """``ade20k:ROOT``: ADEChallengeData2016 (ROOT is that folder, or holds it); splits ``train``
    (``training``) and ``val`` (``validation``). Mask value 0 ("other") is not scored and values
    1..150 are the 150 classes (``reduce_zero_label``)."""

    classes = list(ADE20K_CLASSES)
    reduce_zero_label = True
    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root: str | Path, split: str) -> None:
        given = Path(root).expanduser()
        found = [p for p in (given, given / "ADEChallengeData2016") if (p / "annotations").is_dir()]
        if not found:
            raise DataSourceError(f"{str(given)!r} is not an ADE20K folder (no annotations/); point ade20k: at "
                                  f"ADEChallengeData2016")
        if split not in self.SPLITS:
            raise DataSourceError(f"ade20k: has splits train (training), val (validation); not {split!r}")
        self.root, folder = found[0], self.SPLITS[split]
        self.spec = f"ade20k:{self.root}"
        masks = self.root / "annotations" / folder
        self._pair(_listing(self.root / "images" / folder, "image"), _listing(masks, "mask"), masks,
                   prefix=f"images/{folder}/")
        if not self.ids:
            raise DataSourceError(f"{str(self.root / 'images' / folder)!r} holds no images")


class CocoDetection(FileSource):
    """``coco:IMAGES:ANNOTATIONS.json``: the boxes of a COCO instances file over the images in IMAGES.

    Classes are the categories in id order (category ids become 0..K-1). ``bbox`` (x, y, w, h)
    becomes x1, y1, x2, y2, clipped to the image; crowd regions (``iscrowd``) and boxes with
    no area are left out, as torchvision's detection references do. Images without boxes stay.
    Masks are not read.
    """

    dense = frozenset({"boxes"})

    def __init__(self, images: str | Path, annotations: str | Path) -> None:
        self.root, self.annotations = Path(images).expanduser(), Path(annotations).expanduser()
        self.spec = f"coco:{self.root}:{self.annotations}"
        data = _read_json(self.annotations)
        self.classes, records, self._boxes = _parse_coco(data, str(self.annotations))
        self.ids = sorted(records)
        self._declared = {i: records[i] for i in self.ids}  # (height, width) or None
        files = _listing(self.root, "image")
        absent = [(i, self.root / i) for i in self.ids if i not in files]
        _refuse_missing(absent, len(self.ids), "file", f"{str(self.annotations)!r} lists images that IMAGES lacks")
        self._sizes = {i: files[i] for i in self.ids}
        self.labels = np.zeros(len(self.ids), dtype=np.int64)

    def boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        xyxy, labels = self._boxes[self.ids[index]]
        return xyxy.copy(), labels.copy()

    def image_size(self, index: int) -> tuple[int, int]:
        size, declared = super().image_size(index), self._declared[self.ids[index]]
        if declared is not None and declared != size:
            raise SampleError(f"image {str(self.root / self.ids[index])!r} is {size[1]}x{size[0]} but "
                              f"{str(self.annotations)!r} says {declared[1]}x{declared[0]}; its boxes would be "
                              f"misplaced: use the images the annotations were made for")
        return size

    def _fingerprint_extra(self) -> Any:
        digest = hashlib.sha256()
        for sample in self.ids:
            xyxy, labels = self._boxes[sample]
            digest.update(xyxy.tobytes() + labels.tobytes() + b"|")
        return [super()._fingerprint_extra(), digest.hexdigest()]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataSourceError(f"COCO annotation file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                              f"{exc.colno}); is the file whole? download or write it again") from None
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{str(path)!r} is not UTF-8 JSON ({exc.reason} at byte {exc.start})") from None


def _parse_coco(data: Any, name: str):
    """(classes, {file_name: (height, width) or None}, {file_name: (xyxy, labels)}) of a COCO dict."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DataSourceError(f"{name!r} is not a COCO instances file: it needs lists 'images' and 'categories' "
                              f"(and 'annotations')")
    where = "categories"
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        index = {int(c["id"]): k for k, c in enumerate(cats)}
        classes = [str(c["name"]) for c in cats]
        where, frames, files = "images", {}, {}
        for img in data["images"]:
            if img["file_name"] in frames or int(img["id"]) in files:
                raise DataSourceError(f"{name!r} lists image {img['file_name']!r} (id {img['id']}) twice; "
                                      f"list each image once")
            files[int(img["id"])] = str(img["file_name"])
            size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
            frames[files[int(img["id"])]] = size
        where, found = "annotations", {f: ([], []) for f in files.values()}
        for ann in data.get("annotations") or []:
            if ann.get("iscrowd", 0):
                continue
            if int(ann["image_id"]) not in files or int(ann["category_id"]) not in index:
                what = "image_id" if int(ann["image_id"]) not in files else "category_id"
                raise DataSourceError(f"{name!r}: annotation {ann.get('id')!r} has {what} {ann[what]!r}, which "
                                      f"{'images' if what == 'image_id' else 'categories'} does not list")
            x, y, w, h = (float(v) for v in ann["bbox"])
            file = files[int(ann["image_id"])]
            box = [x, y, x + w, y + h]
            if frames[file] is not None:
                box = list(np.clip(box, 0, [frames[file][1], frames[file][0]] * 2))
            if box[2] > box[0] and box[3] > box[1]:
                found[file][0].append(box)
                found[file][1].append(index[int(ann["category_id"])])
    except DataSourceError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DataSourceError(f"{name!r}: malformed {where} entry ({one_line(exc)}); expected COCO's "
                              f"instances format") from None
    boxes = {f: (np.asarray(b, dtype=np.float32).reshape(-1, 4), np.asarray(lab, dtype=np.int64))
             for f, (b, lab) in found.items()}
    return classes, frames, boxes


def _two_paths(kind: str, arg: str, example: str) -> tuple[str, str]:
    first, sep, second = arg.partition(":")
    if not sep or not first or not second:
        raise DataSourceError(f"{kind}:{arg} needs two paths, e.g. {example}")
    return first, second


def open_segfolder(arg: str, split: str) -> SegFolder:
    """The registry's opener: the folders are the whole split."""
    return SegFolder(*_two_paths("segfolder", arg, "segfolder:/data/images:/data/masks"))


def open_voc(arg: str, split: str) -> VocSegmentation:
    return VocSegmentation(arg, split)


def open_ade20k(arg: str, split: str) -> Ade20k:
    return Ade20k(arg, split)


def open_coco(arg: str, split: str) -> CocoDetection:
    """The registry's opener: the annotation file is the whole split."""
    first, sep, second = arg.rpartition(":")
    if not sep or not first or not second:
        raise DataSourceError(f"coco:{arg} needs IMAGES:ANNOTATIONS.json, e.g. "
                              f"coco:/data/coco/val2017:/data/coco/annotations/instances_val2017.json")
    return CocoDetection(first, second)
