"""The results log: one JSON record per (task, parameters, seed, cache groups).

Records live inside the cache as ``_results/<key>/zarr.json`` attributes, so they travel
with the cache, read with plain zarr, and concurrent writers never tear one another's
records (each record is its own atomically written object). The key is a hash of the
request, so rerunning the same probe on the same cache finds the record instead of
recomputing it; ``force`` replaces it.

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

from backbench.store.cache import Cache
from backbench.store.structure import RESULTS


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
            return dict(self.cache.root[f"{RESULTS}/{key}"].attrs)
        except KeyError:
            return None

    def put(self, record: dict[str, Any]) -> str:
        """Log ``record``; on a read-only cache at a URL, warn once per cache and log nothing."""
        key = record["key"]
        clean = json.loads(json.dumps(record, default=_jsonable))
        if self.cache.is_url and self.cache.read_only:
            self._not_recorded()
            return key
        try:
            self.cache.root.create_group(f"{RESULTS}/{key}", overwrite=True, attributes=clean)
        except PermissionError:  # e.g. an s3:// bucket these credentials may only read
            if not self.cache.is_url:
                raise
            self._not_recorded()
        return key

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
            rows = [dict(g.attrs) for _, g in node.groups()]
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
        outcome = compute()
        record = {**request, **outcome, "key": key, "wall_s": round(time.perf_counter() - started, 4),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "versions": _versions(), "cache": str(self.cache.path)}
        self.put(record)
        return record, False


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
