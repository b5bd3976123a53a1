"""Dense labels in the cache: a (dataset, split)'s segmentation masks and boxes, beside its features.

Dense probes score at the original image's resolution, so the labels are stored as the source
gives them, once per (dataset, split) and shared by every backbone, in the group
``_dense/<dataset>/<split>``:

* masks at full resolution as ragged arrays: ``mask_values`` (every mask's pixels, row-major,
  one after the other, in the smallest integer dtype that holds the classes and the ignore
  index), ``mask_offsets`` (n + 1) and ``mask_shapes`` (n, 2);
* boxes in the original image's pixels: ``boxes`` (M, 4) float32 x1, y1, x2, y2, ``box_labels``
  (M,) and ``box_offsets`` (n + 1);
* ``ids`` and ``image_sizes`` (n, 2) (H, W) always.

The attributes hold the source's fingerprint, classes and ignore index, and the SHA-256 of each
array's bytes, written last: a group without them was torn by a crash. Every read checks the
arrays against their attributes and hashes, and refuses (:class:`DamagedGroup`) what disagrees.
Writers hold a lock of the group's own (:mod:`backbench.store.lock`), so two extractions of one
split by different backbones write it once.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from backbench.errors import CacheMismatch, DamagedGroup, DataSourceError, GroupNotFound
from backbench.store.lock import group_locked

DENSE = "_dense"  # the dense labels' folder at the cache's root
KINDS = ("mask", "boxes")
MASK_CHUNK = 1 << 22  # mask pixels per chunk of mask_values (4 MiB as uint8, compressed)
_BUFFER = 1 << 24  # mask pixels gathered before an append
MASK_ARRAYS = ("mask_values", "mask_offsets", "mask_shapes")
BOX_ARRAYS = ("boxes", "box_labels", "box_offsets")
META = ("dataset_fingerprint", "classes", "ignore_index", "dense", "n")  # hashed as sha256["attributes"]


class DenseSource(Protocol):
    """What :func:`write_dense_labels` reads of a dense image source."""

    spec: str
    ids: list[str]
    classes: list[str]
    dense: frozenset[str]
    ignore_index: int | None

    def __len__(self) -> int: ...

    def fingerprint(self) -> str: ...

    def mask(self, index: int) -> np.ndarray: ...

    def boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def image_size(self, index: int) -> tuple[int, int]: ...


def dense_path(dataset: str, split: str) -> str:
    """``_dense/<dataset>/<split>``: where the dense labels of (dataset, split) live in a cache."""
    from backbench.store.cache import check_name

    return f"{DENSE}/{check_name('dataset', dataset)}/{check_name('split', split)}"


def mask_dtype(num_classes: int, ignore_index: int | None) -> np.dtype:
    """The smallest integer dtype that holds classes ``0..num_classes-1`` and ``ignore_index``."""
    lo, hi = min(0, ignore_index or 0), max(num_classes - 1, ignore_index or 0)
    for dt in ("uint8", "uint16", "int32"):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return np.dtype("int64")


def meta_sha256(attrs: dict[str, Any]) -> str:
    """SHA-256 of the JSON (sorted keys) of the attributes that say what the arrays mean (:data:`META`)."""
    return hashlib.sha256(json.dumps({k: attrs.get(k) for k in META}, sort_keys=True).encode()).hexdigest()


def sha256(values: np.ndarray) -> str:
    """SHA-256 of an array's C-order bytes (strings: of their JSON list, UTF-8)."""
    if values.dtype.kind in "OUT":
        return hashlib.sha256(json.dumps([str(v) for v in values.tolist()]).encode()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(values).view(np.uint8).reshape(-1)).hexdigest()


# -------------------------------------------------------------------------------------- write
def write_dense_labels(cache, dataset: str, split: str, source: DenseSource, *, overwrite: bool = False) -> None:
    """Write ``source``'s dense labels into ``cache`` once: kept when already there from the same
    source (same fingerprint), written again when torn or broken; from another source refused
    (:class:`CacheMismatch`) unless ``overwrite``, which also rewrites labels whose bytes fail
    their hashes."""
    kinds = sorted(set(getattr(source, "dense", ())) & set(KINDS))
    if not kinds:
        raise DataSourceError(f"data source {source.spec!r} has no dense labels (masks or boxes)")
    cache.require_writable("write dense labels")
    path = dense_path(dataset, split)
    with group_locked(cache.path, path):
        node = _node(cache, path)
        if node is not None and _keep(node, path, source, overwrite):
            return
        _write(cache, path, dataset, split, source, kinds)


def _keep(node, path: str, source: DenseSource, overwrite: bool) -> bool:
    """Whether the labels at ``node`` stay: whole, and from this source."""
    attrs = dict(node.attrs)
    if "sha256" not in attrs:  # torn by a crash: written again
        return False
    if attrs.get("dataset_fingerprint") != source.fingerprint():
        if overwrite:
            return False
        raise CacheMismatch(f"{path} holds the dense labels of another source ({attrs.get('source')!r}, fingerprint "
                            f"{str(attrs.get('dataset_fingerprint'))[:12]}); pass --overwrite to replace them or "
                            f"extract under another --dataset/--split name")
    try:
        labels = DenseLabels(node, path)
        if overwrite:  # every byte checked: damaged labels are written again
            labels.verify()
    except DamagedGroup:
        return False
    return True


def _write(cache, path: str, dataset: str, split: str, source: DenseSource, kinds: list[str]) -> None:
    """Create the group, stream the arrays into it, then record their hashes (the 'done' marker)."""
    n, classes = len(source), list(source.classes)
    ignore = None if source.ignore_index is None else int(source.ignore_index)
    attrs = {"backbench_kind": "dense_labels", "dataset": dataset, "split": split, "source": source.spec,
             "dataset_fingerprint": source.fingerprint(), "classes": classes, "ignore_index": ignore,
             "dense": kinds, "n": n, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    node = cache.root.create_group(path, overwrite=True, attributes=attrs)
    sizes = np.array([_size(source, i) for i in range(n)], dtype=np.int64).reshape(n, 2)
    hashes = {"ids": _put(node, "ids", np.asarray(source.ids[:n], dtype=str)),
              "image_sizes": _put(node, "image_sizes", sizes)}
    if "mask" in kinds:
        hashes.update(_write_masks(node, source, sizes, mask_dtype(len(classes), ignore)))
    if "boxes" in kinds:
        hashes.update(_write_boxes(node, source, len(classes)))
    node.attrs.update({"sha256": {**hashes, "attributes": meta_sha256(attrs)}})


def _size(source: DenseSource, i: int) -> tuple[int, int]:
    h, w = source.image_size(i)
    return int(h), int(w)


def _put(node, name: str, values: np.ndarray, chunks: tuple[int, ...] | None = None) -> str:
    """Write one whole array (uncompressed unless chunked by ``chunks``); its SHA-256."""
    rows = max(1, len(values))
    spec: dict[str, Any] = {"chunks": chunks or (rows,) + values.shape[1:]}
    if values.dtype.kind not in "OUT":
        spec["compressors"] = None
    text = values.dtype.kind in "OUT"
    arr = node.create_array(name, shape=values.shape, dtype=str if text else values.dtype,
                            fill_value="" if text else 0, **spec)
    if len(values):
        arr[...] = values
    return sha256(values)


def _write_masks(node, source: DenseSource, sizes: np.ndarray, dtype: np.dtype) -> dict[str, str]:
    """Every mask, checked and appended in order, hashed as it goes."""
    values = node.create_array("mask_values", shape=(0,), dtype=dtype, chunks=(MASK_CHUNK,), fill_value=0)
    digest, offsets, shapes, buffer, held = hashlib.sha256(), [0], [], [], 0
    num_classes, ignore = len(source.classes), source.ignore_index
    for i in range(len(source)):
        m = _checked_mask(source, i, tuple(sizes[i]), num_classes, ignore).astype(dtype).reshape(-1)
        digest.update(m.view(np.uint8))
        buffer.append(m)
        held += len(m)
        offsets.append(offsets[-1] + len(m))
        shapes.append(sizes[i])
        if held >= _BUFFER:
            values.append(np.concatenate(buffer))
            buffer, held = [], 0
    if buffer:
        values.append(np.concatenate(buffer))
    return {"mask_values": digest.hexdigest(),
            "mask_offsets": _put(node, "mask_offsets", np.array(offsets, dtype=np.int64)),
            "mask_shapes": _put(node, "mask_shapes", np.array(shapes, dtype=np.int64).reshape(-1, 2))}


def _checked_mask(source: DenseSource, i: int, size: tuple[int, int], num_classes: int,
                  ignore: int | None) -> np.ndarray:
    """Sample ``i``'s mask, refused unless it is the image's size and holds only classes or the ignore index."""
    m = np.asarray(source.mask(i))
    if m.ndim != 2 or m.shape != size or m.dtype.kind not in "iub":
        raise DataSourceError(f"mask of sample {source.ids[i]!r} is {m.dtype} of shape {m.shape}; want integer "
                              f"classes at the image's size {size[0]}x{size[1]}")
    bad = (m < 0) | (m >= num_classes)
    if ignore is not None:
        bad &= m != ignore
    if bad.any():
        raise DataSourceError(f"mask of sample {source.ids[i]!r} holds {int(m[bad][0])}, not a class "
                              f"(0..{num_classes - 1}) or the ignore index {ignore}")
    return m


def _write_boxes(node, source: DenseSource, num_classes: int) -> dict[str, str]:
    """Every image's boxes and labels, flat, with per-image offsets."""
    boxes, labels, offsets = [], [], [0]
    for i in range(len(source)):
        b, y = source.boxes(i)
        b, y = np.asarray(b, dtype=np.float32).reshape(-1, 4), np.asarray(y, dtype=np.int64).reshape(-1)
        if len(b) != len(y) or ((y < 0) | (y >= num_classes)).any():
            raise DataSourceError(f"boxes of sample {source.ids[i]!r}: {len(b)} boxes with labels {y.tolist()[:8]}; "
                                  f"want one label in 0..{num_classes - 1} per box")
        boxes.append(b)
        labels.append(y)
        offsets.append(offsets[-1] + len(b))
    flat = np.concatenate(boxes) if boxes else np.zeros((0, 4), dtype=np.float32)
    return {"boxes": _put(node, "boxes", flat),
            "box_labels": _put(node, "box_labels", np.concatenate(labels) if labels else np.zeros(0, np.int64)),
            "box_offsets": _put(node, "box_offsets", np.array(offsets, dtype=np.int64))}


# --------------------------------------------------------------------------------------- read
def read_dense_labels(cache, dataset: str, split: str) -> DenseLabels:
    """The dense labels of (dataset, split), checked (see :class:`DenseLabels`)."""
    path = dense_path(dataset, split)
    node = _node(cache, path)
    if node is None:
        raise GroupNotFound(f"cache {cache.path!r} has no dense labels of {dataset}/{split}; extract a source with "
                            f"masks or boxes into it (backbench extract BACKBONE --data voc:ROOT --dataset {dataset} "
                            f"--split {split} --features map)")
    return DenseLabels(node, path)


def _node(cache, path: str):
    """The zarr group at ``path``; None where there is none."""
    try:
        return cache.root[path]
    except KeyError:
        return None
    except Exception as exc:
        raise _damaged(path, f"its zarr.json cannot be read ({type(exc).__name__}: {exc})") from None


def _damaged(path: str, detail: str) -> DamagedGroup:
    dataset, split = path.split("/")[1:3]
    return DamagedGroup(f"dense labels {path} are damaged: {detail}; write them again with `backbench extract "
                        f"BACKBONE --data SOURCE --dataset {dataset} --split {split} --overwrite` (features that "
                        f"match are kept)")


class DenseLabels:
    """The dense labels of one (dataset, split): ``classes``, ``ignore_index``, ``ids``,
    ``image_sizes`` (n, 2) (H, W), the ``dense`` kinds held and the source's ``fingerprint``
    (compare it with a feature group's ``dataset_fingerprint``), checked on opening. Masks
    (:meth:`mask`) and boxes (:meth:`boxes`) are read whole and checked against their SHA-256
    the first time one is asked for."""

    def __init__(self, node: Any, path: str) -> None:
        self.node, self.path = node, path
        self._arrays: dict[str, np.ndarray] = {}
        self._mask_parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        a = dict(node.attrs)
        if "sha256" not in a:
            raise _damaged(path, "it was never finished (its arrays' hashes are missing: a killed extraction?)")
        hashes, dense = a.get("sha256"), a.get("dense")
        if not isinstance(hashes, dict) or not isinstance(dense, list) or not set(dense) <= set(KINDS) \
                or type(a.get("n")) is not int or not isinstance(a.get("classes"), list):
            raise _damaged(path, "its attributes sha256, dense, n or classes are malformed")
        if hashes.get("attributes") != meta_sha256(a):
            raise _damaged(path, f"its attributes {', '.join(META)} fail their SHA-256 (changed since written)")
        self.attrs, self.hashes = a, hashes
        self.classes: list[str] = list(a["classes"])
        self.ignore_index: int | None = a.get("ignore_index")
        self.dense: frozenset[str] = frozenset(dense)
        self.fingerprint: str = str(a.get("dataset_fingerprint"))
        self.ids: list[str] = [str(v) for v in self._array("ids", (a["n"],))]
        self.image_sizes: np.ndarray = self._array("image_sizes", (a["n"], 2))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"DenseLabels({self.path!r}, n={len(self)}, dense={sorted(self.dense)}, classes={len(self.classes)})"

    def _array(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Array ``name`` read whole, checked against its shape and SHA-256 (once)."""
        if name not in self._arrays:
            if name not in self.hashes:
                raise _damaged(self.path, f"its attributes have no SHA-256 of {name}")
            try:
                values = self.node[name][...]
            except KeyError:
                raise _damaged(self.path, f"its {name} array is missing") from None
            except Exception as exc:
                raise _damaged(self.path, f"{name} cannot be read ({type(exc).__name__}: {exc})") from None
            if shape is not None and values.shape != shape:
                raise _damaged(self.path, f"{name} has shape {values.shape}, its attributes say {shape}")
            if sha256(values) != self.hashes[name]:
                raise _damaged(self.path, f"{name} fails its SHA-256 (changed since written)")
            self._arrays[name] = values
        return self._arrays[name]

    def _ragged(self, kind: str, offsets: str, flat: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, flat values) of a ragged kind, checked to agree with each other."""
        if kind not in self.dense:
            held = " and ".join(sorted(self.dense)) or "nothing"
            raise GroupNotFound(f"the dense labels {self.path} have no {kind} (the source gave {held})")
        off = self._array(offsets, (len(self) + 1,))
        values = self._array(flat)
        if len(off) and (off[0] != 0 or (np.diff(off) < 0).any() or off[-1] != len(values)):
            raise _damaged(self.path, f"{offsets} do not split {flat} ({len(values)} values)")
        return off, values

    def _masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, flat values, shapes) of the masks, checked to agree (once)."""
        if self._mask_parts is None:
            off, values = self._ragged("mask", "mask_offsets", "mask_values")
            shapes = self._array("mask_shapes", (len(self), 2))
            if not np.array_equal(shapes.prod(1), np.diff(off)):
                raise _damaged(self.path, "mask_shapes disagree with mask_offsets")
            self._mask_parts = off, values, shapes
        return self._mask_parts

    def mask(self, i: int) -> np.ndarray:
        """The (H, W) int64 class mask of image ``i`` at full resolution (``ignore_index`` where unlabelled)."""
        off, values, shapes = self._masks()
        return values[off[i]: off[i + 1]].astype(np.int64).reshape(int(shapes[i, 0]), int(shapes[i, 1]))

    def boxes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """((M, 4) float32 x1, y1, x2, y2 in the original image's pixels, (M,) int64 labels) of image ``i``."""
        off, boxes = self._ragged("boxes", "box_offsets", "boxes")
        labels = self._array("box_labels", (len(boxes),))
        return boxes[off[i]: off[i + 1]].reshape(-1, 4), labels[off[i]: off[i + 1]]

    def verify(self) -> DenseLabels:
        """Read and check every array (the hashes of all of them), or raise :class:`DamagedGroup`."""
        if "mask" in self.dense:
            self._masks()
        if "boxes" in self.dense:
            off, boxes = self._ragged("boxes", "box_offsets", "boxes")
            self._array("box_labels", (len(boxes),))
        return self
