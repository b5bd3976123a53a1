"""``torchvision:NAME:ROOT``: a ``torchvision.datasets`` classification dataset, read in place."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from backbench.errors import DataSourceError, SampleError
from backbench.extract.datasets.base import ImageSource, one_line, to_rgb
from backbench.labels import normalize_labels


def any_to_rgb(img, name: str):
    """A PIL image, numpy array or tensor (HWC or CHW, uint8 or float in [0, 1]) as RGB PIL."""
    from PIL import Image

    try:
        if isinstance(img, Image.Image):
            img.load()
            return to_rgb(img)
        arr = np.asarray(img.numpy() if hasattr(img, "numpy") else img)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            scale = 255.0 if arr.dtype.kind == "f" and float(arr.max(initial=0)) <= 1.0 else 1.0
            arr = np.clip(arr.astype(np.float64) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    except Exception as exc:
        raise SampleError(f"cannot convert image {name!r} to RGB: {type(exc).__name__}: {exc}") from exc


class TorchvisionSource(ImageSource):
    """``torchvision:NAME:ROOT``: a ``torchvision.datasets`` classification dataset in ROOT.

    ``train=`` datasets (CIFAR10/100, MNIST, FashionMNIST, KMNIST, ...) take the splits
    ``train`` and ``test``; ``split=`` datasets (SVHN, STL10, Food101, DTD, Flowers102,
    OxfordIIITPet, StanfordCars, GTSRB, ...) get backbench's split name as is; datasets with
    neither (EuroSAT, Caltech101, ...) are one whole set under whatever split name is given.
    Nothing is downloaded unless ``download=True`` (``extract --download``).
    """

    LABEL_ATTRS = ("targets", "labels", "_labels", "y")
    SAMPLE_ATTRS = ("samples", "_samples", "imgs")

    def __init__(self, arg: str, split: str, download: bool = False) -> None:
        import inspect

        name, sep, root = arg.partition(":")
        if not sep or not name or not root:
            raise DataSourceError(f"torchvision:{arg} needs NAME:ROOT, e.g. torchvision:CIFAR10:/data/cifar")
        cls = self._dataset_class(name)
        name = cls.__name__
        self.root, self.name, self.split = os.path.expanduser(root), name, split
        self.spec = f"torchvision:{name}:{self.root}"
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {}
        if "train" in params:
            if split not in ("train", "test"):
                raise DataSourceError(f"torchvision {name} has splits train, test; not {split!r}")
            kwargs["train"] = split == "train"
        elif "split" in params:
            kwargs["split"] = split
        self._split_arg = kwargs.get("train", kwargs.get("split"))
        if "download" in params:
            kwargs["download"] = download
        try:
            self._ds = cls(self.root, **kwargs)
        except ValueError as exc:
            import re

            valid = re.search(r"Valid values are \{(.*?)\}", str(exc))
            if valid and "split" in str(exc):
                raise DataSourceError(f"torchvision {name} has splits {valid.group(1)}; not {split!r}") from exc
            raise DataSourceError(f"torchvision {name} in {self.root!r}: {one_line(exc)}") from exc
        except Exception as exc:  # RuntimeError "Dataset not found", FileNotFoundError, ...
            looked = os.path.join(self.root, cls.base_folder) if isinstance(getattr(cls, "base_folder", None), str) \
                else self.root
            hint = ("pass --download to fetch it there" if "download" in params and not download
                    else "check ROOT") + ", or point ROOT at the folder that holds the dataset"
            raise DataSourceError(
                f"torchvision {name} ({split}) has no readable files in {looked!r} ({one_line(exc)}); {hint}"
            ) from exc
        raw = self._read_labels()
        names = self._class_names()
        what = f"torchvision {name} ({split})"
        if names is not None and raw and max(raw) >= len(names):
            names = None  # a class list that does not cover the labels is not trusted
        self.labels, self.classes = normalize_labels(raw, names, what=what)
        self.ids = [f"{split}/{i}" for i in range(len(self.labels))]

    @staticmethod
    def _dataset_class(name: str):
        import inspect

        import torchvision.datasets as tvd

        found = getattr(tvd, name, None)
        if not inspect.isclass(found):
            lower = {n.lower(): n for n in tvd.__all__}
            found = getattr(tvd, lower.get(name.lower(), ""), None)
        if not inspect.isclass(found):
            examples = "CIFAR10, CIFAR100, MNIST, FashionMNIST, SVHN, STL10, Food101, DTD, Flowers102, OxfordIIITPet"
            raise DataSourceError(f"torchvision.datasets has no dataset {name!r}; use a class name such as {examples}")
        return found

    def _read_labels(self) -> list[Any]:
        """Labels without decoding images where the dataset keeps them; else one pass over it."""
        ds, n = self._ds, len(self._ds)
        for attr in self.LABEL_ATTRS:
            value = getattr(ds, attr, None)
            if value is not None and not isinstance(value, (str, bytes)) and len(value) == n:
                arr = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
                if arr.ndim == 1 and arr.dtype.kind in "iu":
                    return arr.astype(np.int64).tolist()
        for attr in self.SAMPLE_ATTRS:
            value = getattr(ds, attr, None)
            if isinstance(value, list) and len(value) == n and all(
                    isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], (int, np.integer)) for s in value):
                return [int(s[1]) for s in value]
        out = []
        for i in range(n):
            target = ds[i][1]
            if hasattr(target, "numpy"):
                target = target.numpy()
            if isinstance(target, np.ndarray) and target.ndim == 0:
                target = target.item()
            if not isinstance(target, (int, np.integer)) or isinstance(target, bool):
                raise DataSourceError(
                    f"torchvision {self.name} sample {i} has target {type(target).__name__}, not a class index; "
                    f"only classification datasets can be extracted"
                )
            out.append(int(target))
        return out

    def _class_names(self) -> list[str] | None:
        for attr in ("classes", "categories"):
            names = getattr(self._ds, attr, None)
            if isinstance(names, (list, tuple)) and names and all(isinstance(c, str) for c in names):
                return list(names)
        return None

    def load(self, index: int):
        try:
            img = self._ds[index][0]
        except Exception as exc:
            raise SampleError(f"cannot read {self.name} sample {self.ids[index]!r}: {one_line(exc)}") from exc
        return any_to_rgb(img, self.ids[index])

    def _fingerprint_extra(self) -> Any:
        return [self.name, self._split_arg]


def open_torchvision(arg: str, split: str, *, download: bool = False) -> TorchvisionSource:
    """The registry's opener: ``NAME:ROOT``; ``download`` lets torchvision fetch missing files."""
    return TorchvisionSource(arg, split, download)
