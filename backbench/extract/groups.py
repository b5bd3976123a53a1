"""The groups an extraction writes: their provenance attributes, and opening, reusing or
creating one (a group made differently is refused), and waiting for shard 0 to create it in a
cache at a URL."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from backbench.errors import CacheError, CacheMismatch, DamagedGroup
from backbench.extract.backbones import Backbone
from backbench.extract.datasets import ImageSource
from backbench.kinds import stored_kind
from backbench.provenance import library_versions
from backbench.store.cache import Cache
from backbench.store.group import PROVENANCE_KEYS, FeatureGroup, chunk_rows_for, group_key


def batch_chunk_rows(dim: int, itemsize: int, n: int, batch_size: int) -> int:
    """Rows per chunk of about 4 MiB, rounded down to whole batches where a batch fits, so no
    batch is cut short at a chunk boundary."""
    rows = chunk_rows_for(dim, itemsize, n)
    return rows // batch_size * batch_size if rows >= batch_size else rows


def group_attrs(backbone: Backbone, source: ImageSource, dataset: str, split: str, dtype: str,
                decoding: dict[str, str] | None = None, kind: str = "pooled", view: str = "center",
                map_grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """A features group's provenance: what made it (backbone, weights, preprocessing and
    decoding, kind and view) and from what (the source and its fingerprint), in JSON. A map
    pooled down (``map_grid``) records its grid with the preprocessing, so the cache key covers it."""
    grid = {"map_grid": [int(v) for v in map_grid]} if map_grid else {}
    return {
        "backbench_kind": "features",
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "backbone_info": backbone.describe(),
        "preprocess": {**backbone.preprocess.to_dict(), **(decoding or {}), **grid},
        "feature_kind": stored_kind(kind, view),
        "dataset": dataset,
        "split": split,
        "source": source.spec,
        "dataset_fingerprint": source.fingerprint(),
        "classes": list(source.classes),
        "multilabel": bool(source.multilabel),
        "dtype": np.dtype(dtype).name,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _shown(record: dict[str, Any], field: str) -> str:
    return repr(record[field]) if field in record else "none"


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The provenance keys that differ; for a record (the preprocessing), which of its fields
    differ and how: ``preprocess (decode: stored 'torchvision-cuda', asked for none)``."""
    out = []
    for k in PROVENANCE_KEYS:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = [f"{f}: stored {_shown(a, f)}, asked for {_shown(b, f)}"
                      for f in sorted({*a, *b}) if a.get(f) != b.get(f)]
            k = f"{k} ({'; '.join(fields)})"
        out.append(k)
    return out


def open_or_create(cache: Cache, attrs: dict[str, Any], n: int, dim: int, num_classes: int,
                   *, overwrite: bool, chunk_rows: int | None, batch_size: int = 1,
                   kind: str = "pooled") -> FeatureGroup:
    """The group for ``attrs``, created if absent; one made differently is refused.

    New groups get row chunks of about 4 MiB rounded to whole batches, so no batch is cut
    short at a chunk boundary (batches never cross chunks).
    """
    key = (attrs["backbone"], attrs["dataset"], attrs["split"], kind)
    if key in cache:
        try:
            group = cache.group(*key)
        except DamagedGroup:
            if not overwrite:
                raise
        else:
            return _reuse(group, attrs, n, overwrite) or _create(cache, key, attrs, n, dim, num_classes,
                                                                 chunk_rows, batch_size)
    return _create(cache, key, attrs, n, dim, num_classes, chunk_rows, batch_size)


def _reuse(group: FeatureGroup, attrs: dict[str, Any], n: int, overwrite: bool) -> FeatureGroup | None:
    """``group`` when it was made as ``attrs`` asks; None to replace it (``overwrite``); else refused."""
    diff = _mismatch(group.attrs, attrs)
    if not diff and group.n == n:
        return group
    if not overwrite:
        raise CacheMismatch(
            f"{group.path} exists with a different {', '.join(diff) or 'number of samples'}; pass --overwrite "
            f"to replace it or extract under another --dataset/--split name"
            + (f" (it holds {group.n} samples, this run asks for {n}: a different --limit? rerun with "
               f"--limit {group.n} to use it, or --overwrite to extract all {n})" if group.n != n else "")
        )
    return None


def _create(cache: Cache, key: tuple[str, str, str, str], attrs: dict[str, Any], n: int, dim: int,
            num_classes: int, chunk_rows: int | None, batch_size: int) -> FeatureGroup:
    if chunk_rows is None:
        chunk_rows = batch_chunk_rows(dim, np.dtype(attrs["dtype"]).itemsize, n, batch_size)
    return cache.create_group(*key, n=n, dim=dim, num_classes=num_classes, dtype=attrs["dtype"],
                              chunk_rows=chunk_rows, attrs=attrs)


SHARD_WAIT_S = 600.0  # how long shards 1..N-1 of a URL cache wait for shard 0 to create the group


def await_group(cache: Cache, attrs: dict[str, Any], n: int, shard: tuple[int, int],
                on_wait: Callable[[], None] | None, timeout: float = SHARD_WAIT_S) -> None:
    """Wait until shard 0 has created the group (made as ``attrs`` asks) in a cache at a URL.

    Stores at URLs have no cross-process locks, so shards that all created the group at once
    would replace one another's chunks; only shard 0 creates it, the others open it.
    """
    key = group_key(attrs)
    deadline, told = time.monotonic() + timeout, False
    while True:
        if key in cache:
            group = cache.group(*key)
            if not _mismatch(group.attrs, attrs) and group.n == n:
                return
        if time.monotonic() > deadline:
            raise CacheError(
                f"shard {shard[0]}/{shard[1]} waited {timeout:.0f}s for shard 0/{shard[1]} to create "
                f"{cache.group_path(*key)} in {cache.path}; start shard 0 (it creates groups at URLs) and rerun"
            )
        if on_wait and not told:
            on_wait()
            told = True
        time.sleep(0.5)

