"""Export cache groups to HDF5 (h5py), and import them back: the same arrays and attributes,
no pickles. Import also takes plain HDF5 features from other tools (thingsvision, ...).

The cached text embeddings (``_text/...``) go out and come back at their own paths, checked
whole on both sides (:mod:`backbench.store.text_groups`)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from backbench.errors import CacheError, CacheMismatch, require
from backbench.labels import LabelRules, normalize_labels
from backbench.store.cache import Cache
from backbench.store.chunks import as_crc
from backbench.store.verify import refuse_damaged
from backbench.store.group import FeatureGroup, cache_key, chunk_rows_for, group_key
from backbench.store.text_groups import check_imported, held_text, is_text_group, refuse_torn, text_groups


JSON_ATTRS = "backbench_json_attrs"  # on each exported group: the attributes stored as JSON text


def _h5_attr(value: Any) -> Any:
    """HDF5 attributes hold scalars and strings; anything nested goes in as JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def export_h5(cache: Cache, target: str | Path, *, chunk_rows: int | None = None) -> list[str]:
    """Copy every group of ``cache`` (and its text embeddings) into the HDF5 file ``target``;
    returns the group paths."""
    h5py = require("h5py", extra="h5")

    written = []
    refuse_damaged(cache)
    texts = list(text_groups(cache))
    refuse_torn(texts, cache.path, "nothing was exported")
    with h5py.File(target, "w") as h5:
        h5.attrs["backbench"] = "feature cache export"
        h5.attrs["source_cache"] = str(cache.path)
        for group in [*cache.groups(bounded=False), *texts]:
            group.check().check_files()
            data = {name: group.node[name][:] for name in ("features", "labels", "ids", "logits", "chunk_checksum")
                    if name in group.node}  # each array read once: checked, then written
            group.check_chunks(data["features"], data["labels"])
            g = h5.require_group(group.path)
            for key, value in group.attrs.items():
                g.attrs[key] = _h5_attr(value)
            g.attrs[JSON_ATTRS] = json.dumps([k for k, v in group.attrs.items() if _h5_attr(v) is not v])
            for name, values in data.items():
                arr = group.array(name)
                if values.dtype.kind in "OUT" or str(values.dtype).startswith("StringDType"):
                    values = np.asarray(values, dtype=object).astype(str).astype(h5py.string_dtype())
                rows = chunk_rows or (arr.chunks[0] if arr.chunks and arr.chunks[0] else None)
                chunks = (min(rows, len(values)),) + values.shape[1:] if rows and len(values) else None
                ds = g.create_dataset(name, data=values, chunks=chunks)
                ds.attrs["dimension_names"] = json.dumps(list(arr.metadata.dimension_names or []))
            written.append(group.path)
    return written


# --------------------------------------------------------------------------- import
LABELS = ("labels", "targets")
IDS = ("ids", "filenames", "file_names")
IMPORTED_WEIGHTS = "unknown (imported from HDF5)"


def import_h5(path: str | Path, cache: Cache, *, backbone: str | None = None, dataset: str | None = None,
              split: str | None = None, dtype: str | None = None) -> list[str]:
    """Import an HDF5 file into ``cache``; returns the paths of its groups now in the cache.

    A file from :func:`export_h5` gives back its groups, attributes and checksums (every
    chunk verified); ``backbone``/``dataset``/``split`` then pick some of them. Any other file
    needs a ``features`` dataset (samples x dims) at its root or in one group, with
    ``labels`` or ``targets`` beside it and optionally ``ids``/``filenames``/``file_names``
    and ``classes``; ``backbone``, ``dataset`` and ``split`` name the group, ``dtype``
    (float16, the default, or float32) its features. See :func:`import_report`.
    """
    report = import_report(path, cache, backbone=backbone, dataset=dataset, split=split, dtype=dtype)
    return report["groups"] + report["already_present"]


def import_report(path: str | Path, cache: Cache, *, backbone: str | None = None, dataset: str | None = None,
                  split: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """:func:`import_h5`, returning ``{"file", "cache", "groups" (imported), "already_present",
    "chunks_copied", "incomplete"}``. Groups the cache holds with another fingerprint are
    refused before anything is written; a group whose copy fails (a chunk that fails its
    checksum, features beyond float16) is not left half-imported: a new one is removed."""
    from backbench.errors import require
    from backbench.store.lock import local_folder, locked
    from backbench.store.merge import fill

    h5py = require("h5py")
    where = str(path)
    if not Path(where).exists():
        raise CacheError(f"no file {where!r}; give the path of an HDF5 file, e.g. features.h5")
    if Path(where).is_dir() or not h5py.is_hdf5(where):
        raise CacheError(f"{where} is not an HDF5 file; import files written by `backbench export` or with h5py "
                         f"(thingsvision, ...)")
    if dtype is not None and dtype not in ("float16", "float32"):
        raise CacheError(f"--dtype {dtype!r}: use float16 or float32")
    try:
        h5 = h5py.File(where, "r")
    except OSError as exc:
        raise CacheError(f"cannot read {where}: {exc}; is it a complete HDF5 file?") from None
    report: dict[str, Any] = {"file": where, "cache": cache.path, "groups": [], "already_present": [],
                              "chunks_copied": 0, "incomplete": []}
    with h5:
        exported = _exported_groups(h5)
        if exported:
            jobs = _plan_exported(where, exported, backbone, dataset, split, dtype)
        else:
            jobs = [_plan_foreign(where, h5, backbone, dataset, split, dtype or "float16")]
        for spec, rows, path_, have in _targets(cache, jobs):
            if have is not None and have.is_complete:
                report["already_present"].append(path_)
                continue
            fresh = have is None
            if fresh:
                have = _create(cache, path_, spec)
            try:
                with locked(local_folder(cache.path, have.path, "features")):
                    written = fill(have, [rows])
            except Exception:
                if fresh:
                    del cache.root[have.path]
                raise
            report["groups" if fresh or written else "already_present"].append(path_)
            report["chunks_copied"] += written
            if not have.is_complete:
                report["incomplete"].append({"group": path_, "rows_done": have.rows_done(), "n": have.n})
    return report


def _create(cache: Cache, path: str, spec: dict[str, Any]) -> FeatureGroup:
    """A new group at ``path`` as ``spec`` describes it (a feature group is also indexed)."""
    from backbench.store.lock import local_folder, locked

    sizes = dict(n=spec["n"], dim=spec["dim"], num_classes=spec["num_classes"], dtype=spec["dtype"],
                 chunk_rows=spec["chunk_rows"], attrs=spec["attrs"])
    with locked(local_folder(cache.path)):
        if is_text_group(spec["attrs"]):  # opened by path, never listed: not in the index
            cache.require_writable("import")
            return FeatureGroup.create(cache.root, path, **sizes)
        return cache.create_group(*group_key(spec["attrs"]), **sizes)


def _held(cache: Cache, attrs: dict[str, Any]) -> tuple[str, FeatureGroup | None]:
    """Where a group with ``attrs`` goes in ``cache``, and the group there now (None if none)."""
    if is_text_group(attrs):
        return held_text(cache, attrs)
    key = group_key(attrs)
    return cache.group_path(*key), cache.group(*key) if key in cache else None


def _targets(cache: Cache, jobs: list) -> list[tuple]:
    """``(spec, rows, path, group or None)`` per job; a group the cache holds with another
    fingerprint or layout is refused here, before anything is written."""
    from backbench.store.merge import check_same, layout

    targets = []
    for spec, rows in jobs:
        path, have = _held(cache, spec["attrs"])
        if have is not None:
            check_same(have.attrs.get("cache_key"), layout(have), cache_key(spec["attrs"]),
                       (spec["n"], spec["dim"], spec["dtype"], spec["num_classes"]),
                       partial(_import_conflict, f"{have.path} exists in {cache.path}"))
        targets.append((spec, rows, path, have))
    return targets


def _import_conflict(where: str, what: str) -> CacheMismatch:
    """Why an import is refused where the cache holds the group otherwise (see :func:`merge.check_same`)."""
    from backbench.store.merge import OTHER_KEY

    if what == OTHER_KEY:
        return CacheMismatch(f"{where} with other contents (cache_key differs); import it under another --dataset "
                             f"or --split; nothing was imported")
    return CacheMismatch(f"{where} {what}; nothing was imported")


def _exported_groups(h5) -> list:
    h5py = require("h5py", extra="h5")

    found: list = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and "features" in obj and "backbone" in obj.attrs and "cache_key" in obj.attrs:
            found.append(obj)

    h5.visititems(visit)
    return found


def _py(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    return value


def _decode_attrs(attrs) -> dict[str, Any]:
    """HDF5 attributes back to the cache's: the JSON-encoded ones (listed by export) decoded."""
    marked = attrs.get(JSON_ATTRS)
    listed = set(json.loads(_py(marked))) if marked is not None else None
    out = {}
    for key, value in attrs.items():
        if key == JSON_ATTRS:
            continue
        value = _py(value)
        guess = listed is None and isinstance(value, str) and (value.startswith(("[", "{")) or value == "null")
        if isinstance(value, str) and ((listed is not None and key in listed) or guess):
            try:
                value = json.loads(value)
            except ValueError:
                if not guess:
                    raise CacheError(f"attribute {key!r} is not the JSON that `backbench export` wrote") from None
        out[key] = value
    return out


def _strings(ds) -> np.ndarray:
    h5py = require("h5py", extra="h5")

    if h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind in "SO":
        return np.asarray(ds.asstr()[()], dtype=object).reshape(-1).astype(str)
    return np.asarray([str(_py(v)) for v in ds[()].reshape(-1)], dtype=str)


def _plan_exported(where: str, groups: list, backbone, dataset, split, dtype) -> list:
    from backbench.store.merge import Rows

    pick = {"backbone": backbone, "dataset": dataset, "split": split}
    jobs = []
    for g in groups:
        attrs = _decode_attrs(g.attrs)
        if any(v is not None and attrs.get(k) != v for k, v in pick.items()):
            continue
        if dtype is not None and dtype != attrs.get("dtype"):
            raise CacheError(f"--dtype is for files from other tools; {where} is a `backbench export` and its "
                             f"groups keep their dtype ({attrs.get('dtype')})")
        feats = g["features"]
        n, dim = int(attrs["n"]), int(attrs["dim"])
        if feats.shape != (n, dim) or g["labels"].shape != (n,) or g["ids"].shape != (n,):
            raise CacheError(f"{where}: group {g.name} holds arrays of other shapes than its attributes say "
                             f"(features {feats.shape}, n={n}, dim={dim}); export it again")
        ids = _strings(g["ids"])
        logits = g["logits"] if "logits" in g else None

        def read(a: int, b: int, g=g, ids=ids, logits=logits):
            return g["features"][a:b], g["labels"][a:b].astype(np.int64), ids[a:b], (
                None if logits is None else logits[a:b])

        stored = (np.array([as_crc(_py(v)) for v in g["chunk_checksum"][()]], dtype=np.int64)
                  if "chunk_checksum" in g else None)
        if is_text_group(attrs):
            check_imported(where, g.name.strip("/"), attrs, stored)
        rows = Rows(f"{where}:{g.name}", n, int(attrs["chunk_rows"]), read, stored=stored,
                    algorithm=attrs.get("checksum", "crc32"))
        spec = {"attrs": attrs, "n": n, "dim": dim, "dtype": attrs["dtype"], "chunk_rows": int(attrs["chunk_rows"]),
                "num_classes": 0 if logits is None else int(logits.shape[1])}
        jobs.append((spec, rows))
    if not jobs:
        held = ", ".join(sorted(g.name.strip("/") for g in groups))
        raise CacheError(f"{where} has no group for the given --backbone/--dataset/--split; it holds: {held}")
    return jobs


def _plan_foreign(where: str, h5, backbone, dataset, split, dtype: str):
    """A file from another tool: one ``features`` dataset with labels (and ids) beside it."""
    from backbench.provenance import library_versions
    from backbench.store.merge import Rows

    ds = _foreign_features(where, h5, backbone, dataset, split)
    n, dim = (int(v) for v in ds.shape)
    places = [ds.parent] + ([h5] if ds.parent.name != "/" else [])
    labels, classes, lab = _foreign_labels(where, ds, places)
    ids, id_ds = _foreign_ids(where, ds, places)
    digest = hashlib.sha256(labels.astype("<i8").tobytes())
    for i in ids.tolist():
        digest.update(i.encode() + b"\0")
    attrs = {"backbench_kind": "features", "backbone": backbone, "weights_sha256": IMPORTED_WEIGHTS,
             "preprocess": {"imported": True}, "feature_kind": "pooled", "dataset": dataset, "split": split,
             "source": f"hdf5:{where}", "dataset_fingerprint": digest.hexdigest(), "classes": classes,
             "dtype": np.dtype(dtype).name, "versions": library_versions(),
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "imported": {"file": where, "features": ds.name, "labels": lab.name,
                          "ids": None if id_ds is None else id_ds.name}}

    def read(a: int, b: int):
        return ds[a:b], labels[a:b], ids[a:b], None

    rows = Rows(f"{where}:{ds.name}", n, 1, read)
    chunk = chunk_rows_for(dim, np.dtype(dtype).itemsize, n)
    return {"attrs": attrs, "n": n, "dim": dim, "dtype": np.dtype(dtype).name, "chunk_rows": chunk,
            "num_classes": 0}, rows


def _foreign_features(where: str, h5, backbone, dataset, split):
    """The file's one ``features`` dataset (samples x dims, numbers), once the cache names for it are given."""
    h5py = require("h5py", extra="h5")

    found: list = []
    h5.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset)
                  and name.rsplit("/", 1)[-1] == "features" else None)
    if not found:
        raise CacheError(f"{where} has no features dataset (and no groups from `backbench export`); it needs "
                         f"`features` (samples x dims) at its root or in one group")
    if len(found) > 1:
        raise CacheError(f"{where} has {len(found)} features datasets ({', '.join(d.name for d in found)}); "
                         f"import takes one per file: copy each to its own file with h5py")
    ds = found[0]
    missing = [f"--{k}" for k, v in (("backbone", backbone), ("dataset", dataset), ("split", split)) if not v]
    if missing:
        raise CacheError(f"{where} is not a `backbench export`: give {', '.join(missing)} to name its features "
                         f"in the cache, e.g. --backbone thingsvision:clip --dataset pets --split train")
    if ds.ndim != 2 or ds.dtype.kind not in "fiu" or not ds.shape[0]:
        raise CacheError(f"{where}: features has shape {ds.shape} and dtype {ds.dtype}; import needs numbers, "
                         f"one row per sample (samples x dims): pool or flatten them first")
    return ds


def _beside(places: list, names: tuple[str, ...]):
    """The first dataset called one of ``names`` in the features' group, then the root; None if none."""
    h5py = require("h5py", extra="h5")

    for place in places:
        for name in names:
            if isinstance(place.get(name), h5py.Dataset):
                return place[name]
    return None


def _foreign_labels(where: str, ds, places: list) -> tuple[np.ndarray, list[str], Any]:
    """(integer labels, class names, the labels dataset) for the features ``ds``, row for row."""
    n = int(ds.shape[0])
    lab = _beside(places, LABELS)
    if lab is None:
        raise CacheError(f"{where} has no labels dataset (looked for {', '.join(LABELS)}); add one with an "
                         f"integer label per row beside {ds.name}, e.g. with h5py")
    raw = lab[()].reshape(-1) if lab.ndim == 2 and 1 in lab.shape else lab[()]
    if np.ndim(raw) != 1 or len(raw) != n:
        raise CacheError(f"{where}: {lab.name} has shape {np.shape(raw)} but {ds.name} has {n} rows; "
                         f"they must match row for row")
    labels, classes = _labels(where, lab.name, raw, _classes(places, ds))
    return labels, classes, lab


def _foreign_ids(where: str, ds, places: list) -> tuple[np.ndarray, Any]:
    """(sample ids, the ids dataset) for the features ``ds``: row numbers as text where the file has none."""
    n = int(ds.shape[0])
    id_ds = _beside(places, IDS)
    if id_ds is None:
        return np.array([str(i) for i in range(n)]), None
    ids = _strings(id_ds)
    if len(ids) != n:
        raise CacheError(f"{where}: {id_ds.name} has {len(ids)} entries but {ds.name} has {n} rows; "
                         f"they must match row for row")
    return ids, id_ds


def _classes(places: list, ds) -> list[str] | None:
    """Class names from a ``classes`` attribute (of the features, their group or the root) or dataset."""
    h5py = require("h5py", extra="h5")

    for obj in [ds, *places]:
        if "classes" in obj.attrs:
            value = _py(obj.attrs["classes"])
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else [value]
            return [str(v) for v in value]
    for place in places:
        if isinstance(place.get("classes"), h5py.Dataset):
            return _strings(place["classes"]).tolist()
    return None


IMPORTED_LABELS = LabelRules(
    error=CacheError, unlabelled=None, int_names="present", numeric_sort=False,
    beyond="{what} runs to {value} but classes names only {count}; labels index the classes from 0",
    unknown="{what} holds {value!r}, which is not in its classes",
)


def _labels(where: str, name: str, raw: np.ndarray, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names: integers are kept (their sorted values as names unless
    ``classes`` names them by index; negative ones are rows without a label); strings become
    indices into their sorted names."""
    if raw.dtype.kind not in "fiub":
        raw, classes = np.asarray([_py(v) for v in raw.tolist()], dtype=str), classes or None
    return normalize_labels(raw, classes, what=f"{where}: {name}", rules=IMPORTED_LABELS)
