"""``wds:PATTERN``: WebDataset tar shards, indexed once and read by offset."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from backbench.errors import DataSourceError, SampleError
from backbench.extract.datasets.base import ImageSource, file_size, one_line, open_rgb_bytes
from backbench.labels import normalize_labels


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
        self.labels, self.classes = normalize_labels(raw, self._class_file(), what=f"wds:{pattern}")
        self._shard_sizes = [[os.path.basename(p), file_size(p)] for p in self._paths]

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
            raise DataSourceError(f"wds: cannot read shard {path!r}: {one_line(exc)}") from exc
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
            raise DataSourceError(f"wds: shard {path!r} is not a readable tar file: {one_line(exc)}") from exc
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
            raise DataSourceError(f"wds: shard {shard}: sample {key!r} .{ext}: {one_line(exc)}") from exc

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
            raise DataSourceError(f"wds: cannot read the class names next to the shards: {one_line(exc)}") from exc
        return None

    def read_bytes(self, index: int) -> bytes:
        path, size = self._paths[self._shard[index]], int(self._size[index])
        try:
            with open(path, "rb") as fh:
                fh.seek(int(self._offset[index]))
                data = fh.read(size)
        except OSError as exc:
            raise SampleError(f"cannot read image {self.ids[index]!r}: {one_line(exc)}") from exc
        if len(data) != size:
            raise SampleError(f"cannot read image {self.ids[index]!r}: shard {path!r} is shorter than its index; "
                              f"it changed since it was opened")
        return data

    def load(self, index: int):
        return open_rgb_bytes(self.read_bytes(index), self.ids[index])

    def _fingerprint_extra(self) -> Any:
        return [self._shard_sizes, self._size.tolist()]  # tar pads shards: image sizes see more edits


def open_wds(arg: str, split: str) -> WebDatasetSource:
    """The registry's opener: the shards are the whole split."""
    return WebDatasetSource(arg)
