"""Captioned images for image-text retrieval: ``captions:PATH.jsonl`` and ``csv:PATH?caption=COL``.

The layout of the Flickr30k and COCO Captions Karpathy splits: one image and one or more
captions per row, image paths relative to the file's folder.

* ``captions:PATH.jsonl``: one JSON object a line, ``{"image": "a.jpg", "caption": "..."}``, the
  caption a string or a list of strings (``captions`` is read too);
* ``csv:PATH?caption=COL[,COL2...]``: a UTF-8 CSV with a ``path`` column and caption columns
  (each non-empty cell of them is one caption of that row's image); rows that repeat an image
  add captions to it.

Images are listed once each, in the order first seen; each keeps its captions in order
(``captions``). They have no class: every label is 0 and the one class is ``image``. The
fingerprint covers the captions, so a group extracted from a source says which captions its
images have; the text-retrieval task reads them back from that source, checked against it.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import numpy as np

from backbench.errors import DataSourceError
from backbench.extract.datasets.base import FileSource
from backbench.extract.datasets.csv import _csv_reader, open_csv as open_labelled_csv


class CaptionSource(FileSource):
    """Images with their captions (``captions[i]``: the list of image ``i``'s captions)."""

    captions: list[list[str]]

    def __init__(self, spec: str, root: Path, rows: list[tuple[str, list[str]]], where: str) -> None:
        self.spec, self.root = spec, root
        merged: dict[str, list[str]] = {}
        for path, caps in rows:
            merged.setdefault(posixpath.normpath(path), []).extend(c.strip() for c in caps if c and c.strip())
        if not merged:
            raise DataSourceError(f"{where} lists no images")
        empty = [p for p, c in merged.items() if not c]
        if empty:
            raise DataSourceError(f"{where}: image {empty[0]!r} has no caption; give each image one at least")
        self.ids = list(merged)
        self.captions = [merged[p] for p in self.ids]
        self.labels = np.zeros(len(self.ids), dtype=np.int64)
        self.classes = ["image"]

    def _fingerprint_extra(self) -> Any:
        return [super()._fingerprint_extra(), self.captions[:len(self.ids)]]


def open_captions(arg: str, split: str) -> CaptionSource:
    """``captions:PATH.jsonl``."""
    file = Path(arg).expanduser().absolute()  # the text-retrieval task reads the captions back from here
    if not file.is_file():
        raise DataSourceError(f"captions file {str(file)!r} does not exist")
    rows = []
    for line, text in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{str(file)!r} line {line} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise DataSourceError(f"{str(file)!r} line {line}: expected {{\"image\": PATH, \"caption\": TEXT or "
                                  f"[TEXT, ...]}}")
        caps = row.get("caption", row.get("captions"))
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DataSourceError(f"{str(file)!r} line {line}: 'caption' must be a string or a list of strings")
        rows.append((row["image"], caps))
    return CaptionSource(f"captions:{file}", file.parent, rows, repr(str(file)))


def open_caption_csv(path: str, columns: list[str]) -> CaptionSource:
    """``csv:PATH?caption=COL[,COL2...]``."""
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise DataSourceError(f"CSV file {str(file)!r} does not exist")
    reader = _csv_reader(file)
    missing = [c for c in ["path", *columns] if c not in (reader.fieldnames or [])]
    if missing:
        raise DataSourceError(f"{str(file)!r} lacks column(s) {', '.join(missing)} "
                              f"(has: {', '.join(reader.fieldnames or [])})")
    rows = []
    for line, row in enumerate(reader, start=2):
        if not (row.get("path") or "").strip():
            raise DataSourceError(f"{str(file)!r} line {line}: empty path")
        rows.append((row["path"].strip(), [row.get(c) or "" for c in columns]))
    return CaptionSource(f"csv:{file}?caption={','.join(columns)}", file.parent, rows, repr(str(file)))


def open_csv(arg: str, split: str, *, labels: list[str] | None = None):
    """The ``csv:`` opener: ``PATH?caption=COL,...`` is captioned, anything else a labelled CSV."""
    if "?caption=" in arg:
        path, _, cols = arg.partition("?caption=")
        columns = [c for c in cols.split(",") if c]
        if not columns:
            raise DataSourceError(f"csv:{arg}: name the caption column(s) after ?caption=")
        return open_caption_csv(path, columns)
    return open_labelled_csv(arg, split, labels=labels)
