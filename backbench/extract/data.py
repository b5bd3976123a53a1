"""Data sources: ``imagefolder:PATH``, ``csv:PATH``, the bundled ``digits`` and ``textures``,
``torchvision:NAME:ROOT``, ``hf-dataset:NAME[:CONFIG]`` and ``wds:PATTERN`` (WebDataset shards).

Every sample has a stable id (its relative path, or its index for digits), an integer
label, and the class names are kept. A source's fingerprint covers ids, labels and file
sizes, so a changed dataset never silently mixes with cached rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backbench.errors import DataSourceError, SampleError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageSource:
    """A labelled list of images. Subclasses fill ``ids``, ``labels``, ``classes``."""

    multilabel = False  # True: ``labels`` are bitmasks over ``classes`` (see CsvSource)

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


def _open_rgb(path: Path | Any, name: str | None = None):
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
                return _to_rgb(img)
    except Exception as exc:
        raise SampleError(f"cannot decode image {name or str(path)!r}: {type(exc).__name__}: {exc}") from exc


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


def _positive(value: str) -> bool:
    """A multi-label cell: 1 (or 1.0, true, yes) is positive; 0, -1 (uncertain) and blank are not."""
    try:
        return float(value) == 1.0
    except ValueError:
        return value.lower() in ("true", "yes")


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


def _csv_reader(file: Path) -> csv.DictReader:
    """A reader over a UTF-8 CSV (a byte-order mark is dropped); other encodings are refused
    naming the first byte that is not UTF-8, rather than misread."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataSourceError(f"{str(file)!r} is not UTF-8: byte 0x{data[exc.start]:02x} on line {line} (offset "
                              f"{exc.start}) is not valid UTF-8; save the CSV as UTF-8 (e.g. `iconv -f latin1 -t "
                              f"utf-8`)") from None
    return csv.DictReader(io.StringIO(text, newline=""))


def _once_each(file: Path, rows: list[tuple[str, str]], lines: list[int]) -> None:
    """Refuse an image listed twice: with two labels it has no true one; with the same label it
    would count twice (and be retrieved by itself). Paths compare normalized (``./a.png`` is ``a.png``)."""
    seen: dict[str, tuple[str, int]] = {}
    for (path, label), line in zip(rows, lines):
        first = seen.setdefault(posixpath.normpath(path), (label, line))
        if first[1] == line:
            continue
        if first[0] != label:
            raise DataSourceError(f"{str(file)!r} lists {path!r} twice with different labels: {first[0]!r} (line "
                                  f"{first[1]}) and {label!r} (line {line}); keep the right one")
        raise DataSourceError(f"{str(file)!r} lists {path!r} twice (lines {first[1]} and {line}); "
                              f"list each image once")


class CsvSource(_FileSource):
    """A UTF-8 CSV with columns ``path,label``; paths relative to the CSV's folder, each listed once.

    Multi-label (``labels=[COL, ...]``, or ``["*"]`` for every column but ``path``): one 0/1
    column per label, as CheXpert's CSVs have (1 is positive; 0, -1 "uncertain" and blank
    count as negative). The classes are the label names, and each sample's label is stored
    as a bitmask (bit k set: label k positive), so the cache keeps one int64 per row;
    ``multilabel`` is True and the probes run one-vs-rest and report mean AUROC.
    """

    MAX_LABELS = 62

    def __init__(self, path: str | Path, labels: list[str] | None = None) -> None:
        file = Path(path).expanduser()
        self.spec, self.root = f"csv:{file}", file.parent
        if not file.is_file():
            raise DataSourceError(f"CSV file {str(file)!r} does not exist")
        if labels:
            return self._multilabel(file, labels)
        reader = _csv_reader(file)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataSourceError(
                f"{str(file)!r} lacks column(s) {', '.join(sorted(missing))}; expected a header 'path,label' "
                f"(or name the label columns of a multi-label CSV with --labels)"
            )
        rows, lines = [], []
        for line, row in enumerate(reader, start=2):
            if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
                raise DataSourceError(f"{str(file)!r} line {line}: empty path or label")
            rows.append((row["path"].strip(), row["label"].strip()))
            lines.append(reader.line_num)
        if not rows:
            raise DataSourceError(f"{str(file)!r} lists no images")
        _once_each(file, rows, lines)
        names = {lab for _, lab in rows}
        numeric = all(n.lstrip("-").isdigit() for n in names)
        self.classes = sorted(names, key=(lambda n: int(n)) if numeric else None)
        index = {n: i for i, n in enumerate(self.classes)}
        self.ids = [p for p, _ in rows]
        self.labels = np.asarray([index[lab] for _, lab in rows], dtype=np.int64)

    def _multilabel(self, file: Path, labels: list[str]) -> None:
        reader = _csv_reader(file)
        fields = list(reader.fieldnames or [])
        cols = [f for f in fields if f != "path"] if labels in (["*"], ["all"]) else list(labels)
        missing = [c for c in ["path", *cols] if c not in fields]
        if missing:
            raise DataSourceError(f"{str(file)!r} lacks column(s) {', '.join(missing)} (has: {', '.join(fields)})")
        if not cols or len(cols) > self.MAX_LABELS:
            raise DataSourceError(f"--labels names {len(cols)} columns; a multi-label CSV needs 1 to "
                                  f"{self.MAX_LABELS}")
        ids, masks, lines = [], [], []
        for line, row in enumerate(reader, start=2):
            if not (row.get("path") or "").strip():
                raise DataSourceError(f"{str(file)!r} line {line}: empty path")
            ids.append(row["path"].strip())
            masks.append(sum(1 << k for k, c in enumerate(cols) if _positive((row.get(c) or "").strip())))
            lines.append(reader.line_num)
        if not ids:
            raise DataSourceError(f"{str(file)!r} lists no images")
        _once_each(file, [(p, "+".join(c for k, c in enumerate(cols) if m >> k & 1) or "none")
                          for p, m in zip(ids, masks)], lines)
        self.spec = f"csv:{file}?labels={','.join(cols)}"
        self.classes, self.ids, self.labels = cols, ids, np.asarray(masks, dtype=np.int64)
        self.multilabel = True


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


def _label_values(values: list[Any], what: str, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names from raw label values (ints or names).

    With ``names`` (a classes file), ints index into it and strings are looked up in it.
    Without, integer labels keep their value and the classes are ``"0" .. str(max)`` (so a
    split that lacks a class still numbers the others alike); string labels become the sorted
    unique names (numerically sorted when all are numbers).
    """
    if not values:
        raise DataSourceError(f"{what} holds no samples")
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
    strs = all(isinstance(v, str) for v in values)
    if not (ints or strs):
        raise DataSourceError(f"{what} mixes integer and text labels (e.g. {values[0]!r}); use one kind")
    if ints:
        labels = np.asarray(values, dtype=np.int64)
        if labels.min() < 0:
            raise DataSourceError(f"{what} has unlabelled samples (label {int(labels.min())}); "
                                  f"extract a labelled split")
        if names is not None:
            if labels.max() >= len(names):
                raise DataSourceError(f"{what} has label {int(labels.max())} but only {len(names)} class names")
            return labels, list(names)
        return labels, [str(i) for i in range(int(labels.max()) + 1)]
    if names is None:
        uniq = set(values)
        numeric = all(n.lstrip("-").isdigit() for n in uniq)
        names = sorted(uniq, key=(lambda n: int(n)) if numeric else None)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataSourceError(f"{what} has label {unknown[0]!r} that its class list lacks")
    return np.asarray([index[v] for v in values], dtype=np.int64), list(names)


def _any_to_rgb(img, name: str):
    """A PIL image, numpy array or tensor (HWC or CHW, uint8 or float in [0, 1]) as RGB PIL."""
    from PIL import Image

    try:
        if isinstance(img, Image.Image):
            img.load()
            return _to_rgb(img)
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
            raise DataSourceError(f"torchvision {name} in {self.root!r}: {_one_line(exc)}") from exc
        except Exception as exc:  # RuntimeError "Dataset not found", FileNotFoundError, ...
            looked = os.path.join(self.root, cls.base_folder) if isinstance(getattr(cls, "base_folder", None), str) \
                else self.root
            hint = ("pass --download to fetch it there" if "download" in params and not download
                    else "check ROOT") + ", or point ROOT at the folder that holds the dataset"
            raise DataSourceError(
                f"torchvision {name} ({split}) has no readable files in {looked!r} ({_one_line(exc)}); {hint}"
            ) from exc
        raw = self._read_labels()
        names = self._class_names()
        what = f"torchvision {name} ({split})"
        if names is not None and raw and max(raw) >= len(names):
            names = None  # a class list that does not cover the labels is not trusted
        self.labels, self.classes = _label_values(raw, what, names)
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
            raise SampleError(f"cannot read {self.name} sample {self.ids[index]!r}: {_one_line(exc)}") from exc
        return _any_to_rgb(img, self.ids[index])

    def _fingerprint_extra(self) -> Any:
        return [self.name, self._split_arg]


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
        import datasets

        feature = ds.features[label]
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        self.labels, self.classes = _label_values(_column(ds, label), what, names)
        self.ids = self._ids(ds, options.get("id"), what)
        self._fp = [getattr(ds, "_fingerprint", None), image, label]
        self._raw = ds.select_columns([image]).cast_column(image, datasets.Image(decode=False))

    @staticmethod
    def _load(name: str, config: str | None, split: str):
        try:
            import datasets
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
            raise DataSourceError(f"hf-dataset: cannot load {where} {name!r}: {_one_line(exc)}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataSourceError(f"hf-dataset {name} has splits {', '.join(ds)}; not {split!r}")
            ds = ds[split]
        return ds

    @staticmethod
    def _columns(ds, image: str | None, label: str | None, what: str) -> tuple[str, str]:
        import datasets

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
            raise SampleError(f"cannot read image {self.ids[index]!r}: {_one_line(exc)}") from exc

    def load(self, index: int):
        import io

        return _open_rgb(io.BytesIO(self.read_bytes(index)), self.ids[index])

    def _fingerprint_extra(self) -> Any:
        return self._fp


def _column(ds, name: str) -> list[Any]:
    """One column of a ``datasets.Dataset`` as a list, read through Arrow (no image decoding)."""
    return ds.select_columns([name]).with_format("arrow")[:].column(name).to_pylist()


def _expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b{x,y}`` -> the 6 names, in order; zero-padded numeric ranges keep their width."""
    import re

    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, rest = pattern[: m.start()], m.group(1), _expand_braces(pattern[m.end():])
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.groups()
        width = max(len(a), len(b)) if (a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0")) else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]
    return [head + o + r for o in options for r in rest]


class WebDatasetSource(ImageSource):
    """``wds:PATTERN``: WebDataset tar shards (``{000..009}`` ranges, globs, or a folder of .tar).

    Opening makes one sequential pass over the shards' headers, grouping members by key (the
    path before the first dot of the file name) and recording each sample's image offset and
    size, so ``load(i)``/``read_bytes(i)`` read one image straight from its shard. The image is
    the ``jpg``/``jpeg``/``png``/``webp`` member, the label the ``cls`` member (an integer) or
    ``json`` (``{"label": ...}``). Ids are ``SHARD/KEY``. A ``classes.txt`` (one name a line)
    or ``classes.json`` (a list) next to the shards names the classes.
    """

    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, pattern: str) -> None:
        self.spec = f"wds:{pattern}"
        self._paths = self._shards(pattern)
        shard_idx, offsets, sizes, ids, raw = [], [], [], [], []
        for s, path in enumerate(self._paths):
            for key, offset, size, label in self._index(path):
                shard_idx.append(s)
                offsets.append(offset)
                sizes.append(size)
                ids.append(f"{os.path.basename(path)}/{key}")
                raw.append(label)
        if not ids:
            raise DataSourceError(f"wds:{pattern}: the shards hold no samples")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataSourceError(f"wds:{pattern}: sample {dup!r} appears twice; keys must be unique per shard")
        self._shard = np.asarray(shard_idx, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._size = np.asarray(sizes, dtype=np.int64)
        self.ids = ids
        self.labels, self.classes = _label_values(raw, f"wds:{pattern}", self._class_file())
        self._shard_sizes = [[os.path.basename(p), _size(p)] for p in self._paths]

    @staticmethod
    def _shards(pattern: str) -> list[str]:
        import glob

        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            found = sorted(glob.glob(os.path.join(glob.escape(expanded), "*.tar")))
            if not found:
                raise DataSourceError(f"wds: folder {expanded!r} holds no .tar shards")
            return found
        paths, missing = [], []
        for name in _expand_braces(expanded):
            if glob.has_magic(name):
                paths += sorted(glob.glob(name))
            elif os.path.isfile(name):
                paths.append(name)
            else:
                missing.append(name)
        if not paths:
            raise DataSourceError(f"wds: no shards match {pattern!r}; give a path such as "
                                  f"/data/train-{{000000..000009}}.tar, a glob or a folder")
        if missing:
            raise DataSourceError(f"wds: {len(missing)} shard(s) of {pattern!r} do not exist, e.g. {missing[0]!r}; "
                                  f"fix the range or the path")
        return list(dict.fromkeys(paths))

    @classmethod
    def _index(cls, path: str):
        """(key, image offset, image size, raw label) per sample of one shard, in order."""
        import re
        import tarfile

        name = os.path.basename(path)
        try:
            with open(path, "rb") as fh:
                magic = fh.read(6)
        except OSError as exc:
            raise DataSourceError(f"wds: cannot read shard {path!r}: {_one_line(exc)}") from exc
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00":
            raise DataSourceError(f"wds: shard {path!r} is compressed; wds: reads images by offset and needs "
                                  f"plain .tar shards (decompress them)")
        samples: list[tuple[str, int, int, Any]] = []
        key, current = None, {}

        def flush() -> None:
            if key is None:
                return
            if "image" not in current:
                raise DataSourceError(f"wds: shard {name}: sample {key!r} has no image "
                                      f"({'/'.join('.' + e for e in cls.IMAGE_EXTS)})")
            if "label" not in current:
                raise DataSourceError(f"wds: shard {name}: sample {key!r} has no label (a .cls member, or .json "
                                      f"with \"label\"); wds: needs labelled samples")
            samples.append((key, *current["image"], current["label"]))

        try:
            with tarfile.open(path, "r:") as tf:
                while (member := tf.next()) is not None:
                    tf.members.clear()  # the index keeps what it needs; don't hold every header
                    if not member.isfile():
                        continue
                    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", member.name)
                    if not m or os.path.basename(member.name).startswith("__"):
                        continue
                    if m.group(1) != key:
                        flush()
                        key, current = m.group(1), {}
                    ext = m.group(2).lower()
                    if ext in cls.IMAGE_EXTS and "image" not in current:
                        current["image"] = (member.offset_data, member.size)
                    elif ext in ("cls", "json") and "label" not in current:
                        current["label"] = cls._parse_label(tf.extractfile(member).read(), ext, name, key)
                flush()
        except tarfile.TarError as exc:
            raise DataSourceError(f"wds: shard {path!r} is not a readable tar file: {_one_line(exc)}") from exc
        return samples

    @staticmethod
    def _parse_label(data: bytes, ext: str, shard: str, key: str) -> Any:
        try:
            text = data.decode("utf-8").strip()
            value = json.loads(text) if ext == "json" else text
            if isinstance(value, dict):
                value = value.get("label", value.get("cls"))
            if isinstance(value, str) and value.lstrip("-").isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
                raise ValueError(f"label {value!r} is neither an integer nor a class name")
            return value
        except Exception as exc:
            raise DataSourceError(f"wds: shard {shard}: sample {key!r} .{ext}: {_one_line(exc)}") from exc

    def _class_file(self) -> list[str] | None:
        folder = os.path.dirname(self._paths[0])
        txt, js = os.path.join(folder, "classes.txt"), os.path.join(folder, "classes.json")
        try:
            if os.path.isfile(txt):
                with open(txt) as fh:
                    return [line.strip() for line in fh if line.strip()]
            if os.path.isfile(js):
                with open(js) as fh:
                    names = json.load(fh)
                if isinstance(names, dict):  # {name: index}
                    names = [n for n, _ in sorted(names.items(), key=lambda kv: kv[1])]
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError("expected a list of class names")
                return names
        except (OSError, ValueError) as exc:
            raise DataSourceError(f"wds: cannot read the class names next to the shards: {_one_line(exc)}") from exc
        return None

    def read_bytes(self, index: int) -> bytes:
        path, size = self._paths[self._shard[index]], int(self._size[index])
        try:
            with open(path, "rb") as fh:
                fh.seek(int(self._offset[index]))
                data = fh.read(size)
        except OSError as exc:
            raise SampleError(f"cannot read image {self.ids[index]!r}: {_one_line(exc)}") from exc
        if len(data) != size:
            raise SampleError(f"cannot read image {self.ids[index]!r}: shard {path!r} is shorter than its index; "
                              f"it changed since it was opened")
        return data

    def load(self, index: int):
        import io

        return _open_rgb(io.BytesIO(self.read_bytes(index)), self.ids[index])

    def _fingerprint_extra(self) -> Any:
        return [self._shard_sizes, self._size.tolist()]  # tar pads shards: image sizes see more edits


SOURCE_KINDS: dict[str, Callable[..., ImageSource]] = {
    "imagefolder": lambda arg, split: ImageFolder(arg),
    "csv": lambda arg, split, labels=None: CsvSource(arg, labels),
    "digits": lambda arg, split: Digits(split),
    "textures": lambda arg, split: Textures(split),
    "torchvision": lambda arg, split, download=False: TorchvisionSource(arg, split, download),
    "hf-dataset": lambda arg, split: HFDatasetSource(arg, split),
    "wds": lambda arg, split: WebDatasetSource(arg),
}
BUILTIN = ("digits", "textures")
USAGE = {"torchvision": "torchvision:NAME:ROOT", "hf-dataset": "hf-dataset:NAME[:CONFIG]", "wds": "wds:PATTERN"}


def split_spec(spec: str) -> tuple[str, str]:
    """``"KIND:ARG"`` -> ``(KIND, ARG)``, checked without opening anything (battle configs use it)."""
    kind, _, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise DataSourceError(
            f"unknown data source {kind!r} in {spec!r}; use one of "
            + ", ".join(k if k in BUILTIN else USAGE.get(k, f"{k}:PATH") for k in SOURCE_KINDS)
        )
    if kind not in BUILTIN and not arg:
        raise DataSourceError(f"data source {kind}: needs a path, e.g. "
                              + {"torchvision": "torchvision:CIFAR10:/data/cifar", "hf-dataset": "hf-dataset:/data/pets",
                                 "wds": "wds:/data/shards/train-{000000..000009}.tar"}.get(kind, f"{kind}:/data/train"))
    return kind, arg


def open_source(spec: str, split: str, *, download: bool = False, labels: list[str] | None = None) -> ImageSource:
    """Open a data source from ``KIND:ARG`` (built-in ``digits`` and ``textures`` need none).

    ``download`` lets a ``torchvision:`` dataset fetch missing files; other kinds ignore it.
    ``labels`` names the label columns of a multi-label ``csv:`` (``csv:PATH?labels=A,B`` too).
    """
    import inspect

    kind, arg = split_spec(spec)
    factory = SOURCE_KINDS[kind]
    if kind == "csv" and "?labels=" in arg:
        arg, _, cols = arg.partition("?labels=")
        labels = labels or [c for c in cols.split(",") if c]
    kw: dict[str, Any] = {}
    if download and "download" in inspect.signature(factory).parameters:
        kw["download"] = True
    if labels:
        if "labels" not in inspect.signature(factory).parameters:
            raise DataSourceError(f"--labels (multi-label columns) works with csv: sources, not {kind}:")
        kw["labels"] = list(labels)
    return factory(arg, split, **kw)
