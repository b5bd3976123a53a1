"""The results log: one JSON record per (task, parameters, seed, cache groups).

Records live inside the cache as ``_results/<key>/zarr.json`` attributes, so they travel
with the cache, read with plain zarr, and concurrent writers never tear one another's
records (each record is its own atomically written object). The key is a hash of the
request, so rerunning the same probe on the same cache finds the record instead of
recomputing it; ``force`` replaces it.

A record may carry per-sample outcomes as arrays (``outcomes``: per-image IoU counts,
detections): zarr arrays inside the record's group, each with its shape, dtype and SHA-256 in
the record, so intervals can be computed later without refitting. The arrays are written
before the record's attributes: a group without a ``key`` attribute is not a record yet.

A cache read over ``http(s)://`` (or at a URL the credentials cannot write) still computes
results; they are returned but not recorded, with one :class:`ResultsNotRecorded` warning.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from datetime import datetime, timezone
from typing import Any, Callable

from backbench.errors import DamagedGroup
from backbench.store.cache import Cache
from backbench.store.structure import RESULTS

OUTCOMES = "outcomes"  # the record field naming its arrays: {name: {shape, dtype, sha256}}


def request_key(request: dict[str, Any]) -> str:
    """A stable key for a request: task, backbone, dataset, splits, params, seed, group keys."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:32]


def results_groups(cache: Cache) -> list[tuple[str, Any]]:
    """(key, zarr group) of each record in the cache's results log; [] when it has none.

    The raw nodes, for the modules that copy records between caches (pack, merge) as they are.
    """
    try:
        return list(cache.root[RESULTS].groups())
    except KeyError:
        return []


class ResultsNotRecorded(UserWarning):
    """Results computed on a read-only cache at a URL: returned, not logged (the CLI prints a note)."""


class ResultsLog:
    """Read and append records of one cache."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            attrs = dict(self.cache.root[f"{RESULTS}/{key}"].attrs)
        except KeyError:
            return None
        return attrs if "key" in attrs else None  # outcomes written, attributes not yet: no record

    def put(self, record: dict[str, Any], outcomes: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Log ``record`` with its ``outcomes`` arrays; returns the record as logged (JSON, with
        the arrays' manifest). On a read-only cache at a URL, warn once per cache, log nothing
        and return None."""
        import numpy as np

        arrays = {name: np.ascontiguousarray(a) for name, a in (outcomes or {}).items()}
        clean = json.loads(json.dumps(record, default=_jsonable))
        if arrays:
            clean[OUTCOMES] = {name: {"shape": list(a.shape), "dtype": a.dtype.name, "sha256": _sha256(a)}
                               for name, a in arrays.items()}
        if self.cache.is_url and self.cache.read_only:
            self._not_recorded()
            return None
        path = f"{RESULTS}/{record['key']}"
        try:
            if not arrays:
                self.cache.root.create_group(path, overwrite=True, attributes=clean)
                return clean
            node = self.cache.root.create_group(path, overwrite=True, attributes={})
            for name, a in arrays.items():
                node.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.shape or None,
                                  fill_value=0)[...] = a
            node.attrs.update(clean)
        except PermissionError:  # e.g. an s3:// bucket these credentials may only read
            if not self.cache.is_url:
                raise
            self._not_recorded()
            return None
        return clean

    def outcomes(self, record: dict[str, Any]) -> dict[str, Any]:
        """The per-sample arrays of ``record`` (``{}`` for a record without any), each checked
        against the shape, dtype and SHA-256 the record holds; :class:`DamagedGroup` otherwise."""
        wanted = record.get(OUTCOMES) or {}
        path = f"{RESULTS}/{record.get('key')}"
        out = {}
        for name, meta in wanted.items():
            try:
                values = self.cache.root[f"{path}/{name}"][...]
            except Exception as exc:
                raise DamagedGroup(f"record {path}: its outcome array {name} cannot be read "
                                   f"({type(exc).__name__}); rerun the task with --force to recompute it") from None
            if list(values.shape) != list(meta.get("shape", [])) or values.dtype.name != meta.get("dtype") \
                    or _sha256(values) != meta.get("sha256"):
                raise DamagedGroup(f"record {path}: its outcome array {name} fails its shape, dtype or SHA-256 "
                                   f"(changed since written); rerun the task with --force to recompute it")
            out[name] = values
        return out

    def _not_recorded(self) -> None:
        if getattr(self.cache, "_results_noted", False):
            return
        self.cache._results_noted = True
        warnings.warn(f"results not recorded: the cache at {self.cache.path} is read-only",
                      ResultsNotRecorded, stacklevel=3)

    def records(self) -> list[dict[str, Any]]:
        try:
            node = self.cache.root[RESULTS]
        except KeyError:
            return []
        try:
            rows = [a for a in (dict(g.attrs) for _, g in node.groups()) if "key" in a]
        except Exception:
            if not self.cache.is_url:
                raise
            return []  # a store that cannot list (plain HTTP): no records to show
        return sorted(rows, key=lambda r: (r.get("created", ""), r.get("key", "")))

    def run(self, request: dict[str, Any], compute: Callable[[], dict[str, Any]], *,
            force: bool = False) -> tuple[dict[str, Any], bool]:
        """The record for ``request``: reused if logged (unless ``force``), else computed and logged.

        Returns (record, reused).
        """
        key = request_key(request)
        if not force and (old := self.get(key)) is not None:
            return old, True
        started = time.perf_counter()
        outcome = dict(compute())
        arrays = outcome.pop(OUTCOMES, None) or {}
        record = {**request, **outcome, "key": key, "wall_s": round(time.perf_counter() - started, 4),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "versions": _versions(), "cache": str(self.cache.path)}
        logged = self.put(record, arrays)
        return (logged or record) if arrays else record, False  # with arrays: the record with their manifest


def _sha256(values: Any) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _versions() -> dict[str, str]:
    from backbench.provenance import library_versions

    return library_versions("scikit-learn", "faiss-cpu")
