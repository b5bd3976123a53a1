"""Data sources, one module per kind, behind a small prefix dispatch (as timm's
``data/readers/`` and ``reader_factory.py``): ``imagefolder:PATH``, ``csv:PATH``, the built-in
``cifar10-mini``, ``digits`` and ``textures``, ``torchvision:NAME:ROOT``, ``hf-dataset:NAME[:CONFIG]`` and
``wds:PATTERN`` (WebDataset shards); captioned sources (:mod:`.captions`, for image-text
retrieval): ``captions:PATH.jsonl`` and ``csv:PATH?caption=COL``; dense sources (pixel masks or
object boxes, :mod:`.dense`):
``segfolder:IMAGES:MASKS``, ``voc:ROOT``, ``ade20k:ROOT``, ``coco:IMAGES:ANNOTATIONS.json`` and the
built-in ``shapes``.

:data:`SOURCES` maps each prefix to its opener and declares the options it takes, so a spec is
checked without opening anything and a new kind is one module plus one entry here. Labels are
normalised in one place, :mod:`backbench.labels`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from backbench.errors import DataSourceError
from backbench.extract.datasets import builtin, dense, folder, hf, shapes, torchvision, wds
from backbench.extract.datasets import captions
from backbench.extract.datasets.base import FileSource, ImageSource, open_rgb, open_rgb_bytes, to_rgb
from backbench.extract.datasets.builtin import Cifar10Mini, Digits, Textures
from backbench.extract.datasets.csv import CsvSource
from backbench.extract.datasets.dense import Ade20k, CocoDetection, MaskSource, SegFolder, VocSegmentation, read_mask
from backbench.extract.datasets.folder import IMAGE_EXTENSIONS, ImageFolder
from backbench.extract.datasets.hf import HFDatasetSource
from backbench.extract.datasets.shapes import Shapes, write_shapes
from backbench.extract.datasets.torchvision import TorchvisionSource
from backbench.extract.datasets.wds import WebDatasetSource

__all__ = [
    "IMAGE_EXTENSIONS", "SOURCES", "Ade20k", "Cifar10Mini", "CocoDetection", "CsvSource", "Digits", "FileSource",
    "HFDatasetSource", "ImageFolder", "ImageSource", "MaskSource", "SegFolder", "Shapes", "SourceKind", "Textures",
    "TorchvisionSource", "VocSegmentation", "WebDatasetSource", "limit_source", "open_rgb", "open_rgb_bytes",
    "open_source", "read_mask", "split_spec", "to_rgb", "write_shapes",
]


@dataclass(frozen=True)
class SourceKind:
    """One data source prefix: its opener ``(arg, split, **options) -> ImageSource``, how to
    write it, an example with a path (None for built-in sets, which take none) and the
    keyword options its opener accepts (``download``, ``labels``)."""

    opener: Callable[..., ImageSource]
    usage: str
    example: str | None
    options: frozenset[str] = frozenset()


SOURCES: dict[str, SourceKind] = {
    "imagefolder": SourceKind(folder.open_folder, "imagefolder:PATH", "imagefolder:/data/train"),
    "csv": SourceKind(captions.open_csv, "csv:PATH[?caption=COL]", "csv:/data/train", frozenset({"labels"})),
    "captions": SourceKind(captions.open_captions, "captions:PATH.jsonl", "captions:/data/flickr30k/test.jsonl"),
    "cifar10-mini": SourceKind(builtin.open_cifar10_mini, "cifar10-mini", None),
    "digits": SourceKind(builtin.open_digits, "digits", None),
    "textures": SourceKind(builtin.open_textures, "textures", None),
    "torchvision": SourceKind(torchvision.open_torchvision, "torchvision:NAME:ROOT",
                              "torchvision:CIFAR10:/data/cifar", frozenset({"download"})),
    "hf-dataset": SourceKind(hf.open_hf, "hf-dataset:NAME[:CONFIG]", "hf-dataset:/data/pets"),
    "wds": SourceKind(wds.open_wds, "wds:PATTERN", "wds:/data/shards/train-{000000..000009}.tar"),
    "segfolder": SourceKind(dense.open_segfolder, "segfolder:IMAGES:MASKS", "segfolder:/data/images:/data/masks"),
    "voc": SourceKind(dense.open_voc, "voc:ROOT", "voc:/data/VOCdevkit/VOC2012"),
    "ade20k": SourceKind(dense.open_ade20k, "ade20k:ROOT", "ade20k:/data/ADEChallengeData2016"),
    "coco": SourceKind(dense.open_coco, "coco:IMAGES:ANNOTATIONS.json",
                       "coco:/data/coco/val2017:/data/coco/annotations/instances_val2017.json"),
    "shapes": SourceKind(shapes.open_shapes, "shapes", None),
}


def split_spec(spec: str) -> tuple[str, str]:
    """``"KIND:ARG"`` -> ``(KIND, ARG)``, checked without opening anything (battle configs use it)."""
    kind, _, arg = spec.partition(":")
    if kind not in SOURCES:
        raise DataSourceError(
            f"unknown data source {kind!r} in {spec!r}; use one of " + ", ".join(s.usage for s in SOURCES.values())
        )
    example = SOURCES[kind].example
    if example is not None and not arg:
        raise DataSourceError(f"data source {kind}: needs a path, e.g. {example}")
    return kind, arg


def open_source(spec: str, split: str, *, download: bool = False, labels: list[str] | None = None) -> ImageSource:
    """Open a data source from ``KIND:ARG`` (built-in ``cifar10-mini``, ``digits``, ``textures``, ``shapes`` need none).

    ``download`` lets a ``torchvision:`` dataset fetch missing files; other kinds ignore it.
    ``labels`` names the label columns of a multi-label ``csv:`` (``csv:PATH?labels=A,B`` too).
    """
    kind, arg = split_spec(spec)
    source = SOURCES[kind]
    options: dict[str, object] = {}
    if download and "download" in source.options:
        options["download"] = True
    if labels:
        if "labels" not in source.options:
            raise DataSourceError(f"--labels (multi-label columns) works with csv: sources, not {kind}:")
        options["labels"] = list(labels)
    return source.opener(arg, split, **options)


def limit_source(source: ImageSource, limit: int | None) -> ImageSource:
    """The first ``limit`` samples of ``source`` (its fingerprint covers just those)."""
    if limit is None or limit >= len(source):
        return source
    sub = copy.copy(source)
    sub.ids, sub.labels = source.ids[:limit], source.labels[:limit]
    return sub
