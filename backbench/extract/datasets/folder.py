"""``imagefolder:PATH``: one folder per class (``PATH/<class>/<image>``), classes sorted by name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backbench.errors import DataSourceError
from backbench.extract.datasets.base import FileSource

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def list_images(folder: str, prefix: str) -> dict[str, int]:
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


class ImageFolder(FileSource):
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
            found = list_images(str(self.root / name), name)
            self._sizes.update(found)
            files = sorted(found)
            if not files:
                raise DataSourceError(f"class folder {str(self.root / name)!r} holds no images; remove it or add images")
            ids += files
            labels += [label] * len(files)
        self.ids, self.labels = ids, np.asarray(labels, dtype=np.int64)


def open_folder(arg: str, split: str) -> ImageFolder:
    """The registry's opener: the folder is the whole split."""
    return ImageFolder(arg)
