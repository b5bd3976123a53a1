"""Regenerate ``backbench/extract/datasets/data/cifar10-mini.zip`` from the CIFAR-10 training
images as JPEGs (the layout ``cifar10/train/<class>/<nnnn>.jpg`` of a tarball such as
``../shared/data/cifar10-train.tar.gz``).

Per class, in file-name order: the first 100 images are the ``train`` split, the next 50 the
``test`` split (1,500 images, about 1.4 MB). The zip is byte-reproducible: sorted entries,
stored (JPEGs do not compress), a fixed timestamp.

    python tools/make_cifar10_mini.py ../shared/data/cifar10-train.tar.gz
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

TRAIN, TEST = 100, 50
OUT = Path(__file__).resolve().parents[1] / "backbench/extract/datasets/data/cifar10-mini.zip"


def main(tarball: str) -> None:
    by_class: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        for m in members:
            parts = m.name.split("/")
            if len(parts) == 4 and parts[1] == "train":
                by_class.setdefault(parts[2], []).append(m)
        entries = []
        for cls in sorted(by_class):
            files = sorted(by_class[cls], key=lambda m: m.name)[: TRAIN + TEST]
            for i, m in enumerate(files):
                split = "train" if i < TRAIN else "test"
                entries.append((f"{split}/{cls}/{m.name.rsplit('/', 1)[1]}", tar.extractfile(m).read()))
    entries.sort()
    with zipfile.ZipFile(OUT, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2009, 4, 8, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    print(f"{OUT}: {len(entries)} images from {len(by_class)} classes, {OUT.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1])
