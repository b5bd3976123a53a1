"""``hf-dataset:NAME[:CONFIG]``: a Hugging Face ``datasets`` dataset (saved, local or on the hub)."""

from __future__ import annotations

import os
from typing import Any

from backbench.errors import DataSourceError, SampleError, require
from backbench.extract.datasets.base import ImageSource, one_line, open_rgb_bytes
from backbench.labels import normalize_labels


class HFDatasetSource(ImageSource):
    """``hf-dataset:NAME[:CONFIG][?image=COL&label=COL&id=COL]`` via the ``datasets`` library.

    NAME is a directory written by ``save_to_disk`` (opened with ``load_from_disk``), a local
    folder or file ``load_dataset`` reads (imagefolder, parquet, ...), or a hub id. The image
    column is the one ``datasets.Image`` feature and the label column the one ``ClassLabel``
    (else a column named ``label``/``labels``); ``?image=``/``?label=`` pick them by name.
    Ids come from an ``id``, ``image_id`` or ``file_name`` column with unique values (or
    ``?id=``), else ``SPLIT/INDEX``.
    """

    ID_COLUMNS = ("id", "image_id", "file_name")
    OPTIONS = ("image", "label", "id")

    def __init__(self, arg: str, split: str) -> None:
        from urllib.parse import parse_qsl

        target, _, query = arg.partition("?")
        name, _, config = target.partition(":")
        if not name:
            raise DataSourceError(f"hf-dataset:{arg} needs a dataset, e.g. hf-dataset:/data/pets or hf-dataset:cifar10")
        options = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise DataSourceError(f"hf-dataset: unknown option {unknown[0]!r} in {arg!r}; use ?image=COL&label=COL&id=COL")
        self.spec, self.split = f"hf-dataset:{arg}", split
        ds = self._load(os.path.expanduser(name), config or None, split)
        what = f"hf-dataset {name} ({split})"
        image, label = self._columns(ds, options.get("image"), options.get("label"), what)
        self._image, self._label = image, label
        datasets = require("datasets", extra="hf")

        feature = ds.features[label]
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        self.labels, self.classes = normalize_labels(_column(ds, label), names, what=what)
        self.ids = self._ids(ds, options.get("id"), what)
        self._fp = [getattr(ds, "_fingerprint", None), image, label]
        self._raw = ds.select_columns([image]).cast_column(image, datasets.Image(decode=False))

    @staticmethod
    def _load(name: str, config: str | None, split: str):
        try:
            datasets = require("datasets", extra="hf")
        except ImportError as exc:
            raise DataSourceError("hf-dataset: needs the datasets library; pip install 'datasets>=2.19'") from exc
        if name.startswith(("/", "./", "../", "~")) and not os.path.exists(name):
            raise DataSourceError(f"hf-dataset: local path {name!r} does not exist; give a save_to_disk folder, "
                                  f"a data folder or a hub id such as owner/name")
        saved = os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f))
                                            for f in ("dataset_dict.json", "state.json"))
        try:
            if saved:
                if config:
                    raise DataSourceError(f"hf-dataset: {name!r} was written by save_to_disk and has no "
                                          f"configs; drop :{config}")
                ds = datasets.load_from_disk(name)
            else:
                ds = datasets.load_dataset(name, config, split=split)
        except DataSourceError:
            raise
        except Exception as exc:
            import re

            found = re.search(r"[Ss]plit.*?(\[.*?\])", str(exc))
            if found and split in str(exc):
                raise DataSourceError(f"hf-dataset {name} has splits {found.group(1)}; not {split!r}") from exc
            where = "local path" if os.path.exists(name) else "hub dataset (no local path of that name)"
            raise DataSourceError(f"hf-dataset: cannot load {where} {name!r}: {one_line(exc)}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataSourceError(f"hf-dataset {name} has splits {', '.join(ds)}; not {split!r}")
            ds = ds[split]
        return ds

    @staticmethod
    def _columns(ds, image: str | None, label: str | None, what: str) -> tuple[str, str]:
        datasets = require("datasets", extra="hf")

        features, columns = ds.features, ", ".join(ds.features)
        for col in (image, label):
            if col is not None and col not in features:
                raise DataSourceError(f"{what} has no column {col!r}; columns: {columns}")
        if image is None:
            found = [c for c, f in features.items() if isinstance(f, datasets.Image)]
            if len(found) != 1:
                raise DataSourceError(
                    f"{what} has {'no' if not found else 'several'} image columns ({', '.join(found) or columns}); "
                    f"name one with ?image=COL"
                )
            image = found[0]
        elif not isinstance(features[image], datasets.Image):
            raise DataSourceError(f"{what} column {image!r} is {features[image]!r}, not an Image feature")
        if label is None:
            found = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
            if not found:
                found = [c for c in ("label", "labels") if c in features][:1]
            if len(found) != 1:
                raise DataSourceError(
                    f"{what} has {'no' if not found else 'several'} ClassLabel columns ({', '.join(found) or columns}); "
                    f"name the label column with ?label=COL"
                )
            label = found[0]
        return image, label

    def _ids(self, ds, column: str | None, what: str) -> list[str]:
        candidates = [column] if column else [c for c in self.ID_COLUMNS if c in ds.features]
        for col in candidates:
            if col not in ds.features:
                raise DataSourceError(f"{what} has no column {col!r}; columns: {', '.join(ds.features)}")
            ids = [str(v) for v in _column(ds, col)]
            if len(set(ids)) == len(ids):
                return ids
            if column:
                raise DataSourceError(f"{what} column {col!r} repeats values; ids must be unique")
        return [f"{self.split}/{i}" for i in range(len(ds))]

    def read_bytes(self, index: int) -> bytes:
        try:
            cell = self._raw[int(index)][self._image]
            if cell.get("bytes") is not None:
                return cell["bytes"]
            with open(cell["path"], "rb") as fh:
                return fh.read()
        except Exception as exc:
            raise SampleError(f"cannot read image {self.ids[index]!r}: {one_line(exc)}") from exc

    def load(self, index: int):
        return open_rgb_bytes(self.read_bytes(index), self.ids[index])

    def _fingerprint_extra(self) -> Any:
        return self._fp


def _column(ds, name: str) -> list[Any]:
    """One column of a ``datasets.Dataset`` as a list, read through Arrow (no image decoding)."""
    return ds.select_columns([name]).with_format("arrow")[:].column(name).to_pylist()


def open_hf(arg: str, split: str) -> HFDatasetSource:
    """The registry's opener: ``NAME[:CONFIG][?image=COL&label=COL&id=COL]``."""
    return HFDatasetSource(arg, split)
