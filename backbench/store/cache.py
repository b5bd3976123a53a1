"""The Zarr feature cache: one store, one group per (backbone, dataset, split).

Layout (all readable with plain ``zarr.open_group(path, mode="r")``)::

    features.zarr/
      zarr.json                      attrs: backbench schema version
      <backbone-slug>/<dataset>/<split>/
        features       (sample, feature)  float16|float32, chunked by rows, uncompressed
        labels         (sample,)          int64
        ids            (sample,)          string
        logits         (sample, class)    optional, the backbone's own classifier
        chunk_checksum (chunk,)           int64: -1 until that row chunk is written, then its CRC-32
      _results/<key>/                    one group per results record, the record in its attrs

The root's ``backbench_groups`` attribute lists every group path created through
:meth:`Cache.create_group`, so a cache served over plain HTTP without directory listings
still knows its groups. Caches at URLs (``s3://``, ``gs://``, ``memory://``, ...) go through
zarr's fsspec store; ``http(s)://`` caches are read-only.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote

from backbench.errors import BackbenchError, CacheError, DamagedGroup, DamagedWarning, GroupNotFound
from backbench.store.group import FeatureGroup
from backbench.store.location import Location
from backbench.store.remote import ListBudget, check_filesystem, remote_groups, url_store, warn_unsafe
from backbench.store.structure import RESULTS, group_path_ok  # noqa: F401 (RESULTS: public here too)

SCHEMA_VERSION = 2  # 2: int64 chunk checksums, raw labels (schema 1 caches still read)
INDEX = "backbench_groups"  # root attribute: the group paths, for stores that cannot list
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
def default_cache_path(cache: str | os.PathLike | None = None) -> str:
    """``--cache``, else ``$BACKBENCH_CACHE``, else ``./features.zarr``."""
    return str(cache or os.environ.get("BACKBENCH_CACHE") or "features.zarr")


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value or ""):
        raise CacheError(f"{kind} name {value!r} must be letters, digits and . _ + - (e.g. cifar10, train)")
    return value


def backbone_slug(name: str) -> str:
    """A folder name for a backbone; weights paths become their stem plus a short hash."""
    core, at, weights = name.partition("@")
    slug = re.sub(r"[^A-Za-z0-9._+~-]", "_", core.replace(":", "~").replace("/", "~"))
    if at:
        if re.match(r"^[A-Za-z0-9._+-]+$", weights) and "/" not in weights:
            slug += f"@{weights}"
        else:
            stem = re.sub(r"[^A-Za-z0-9._+-]", "_", Path(weights).stem)[:40]
            slug += f"@{stem}-{hashlib.sha256(weights.encode()).hexdigest()[:8]}"
    return slug


class Cache:
    """A feature cache at a local path (or ``file://``), or at a URL through zarr's fsspec store.

    ``mode``: "a" creates the cache if needed (extraction), "r+" needs it to exist (probes,
    which write results), "r" reads only. ``http(s)://`` caches always open read-only: reads
    work in any mode, writes are refused (:meth:`require_writable`). Credentials and options
    of ``s3://``, ``gs://``, ... come from fsspec's environment and config, or ``storage_options``.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, mode: str = "a",
                 storage_options: dict[str, Any] | None = None) -> None:
        import zarr
        from zarr.errors import ContainsGroupError, GroupNotFoundError

        self.path = default_cache_path(path)
        self.location = Location.of(self.path)
        self.scheme = self.location.scheme
        self.read_only = mode == "r" or not self.location.writable
        missing = CacheError(f"no feature cache at {self.path!r}; run `backbench extract` first or pass --cache")
        local = self.location.local_path
        if local is not None:
            if local.exists() and not local.is_dir():
                raise CacheError(f"cache path {self.path!r} is a file; give a folder such as features.zarr")
            if mode in ("r", "r+") and not (local / "zarr.json").exists():
                raise missing
            store: Any = str(local)  # zarr's LocalStore: the fast raw-chunk paths and locks apply
        try:
            if local is None:
                check_filesystem(self.scheme)
                store = url_store(self.path, self.scheme, self.read_only, storage_options)
            try:
                self.root = zarr.open_group(store, mode="r" if self.read_only else mode)
            except ContainsGroupError:  # another process created the cache between zarr's look and its create
                self.root = zarr.open_group(store, mode="r+")
        except BackbenchError:
            raise
        except (GroupNotFoundError, FileNotFoundError):
            if mode == "a" and not self.location.writable:
                raise CacheError(self._read_only_message("extract")) from None
            raise missing from None
        except Exception as exc:
            what = "its root zarr.json cannot be read: " if isinstance(exc, ValueError) else ""
            raise CacheError(f"cannot open cache {self.path!r}: {what}{type(exc).__name__}: {exc}") from exc
        version = self.root.attrs.get("backbench_schema_version")
        if version is None and not self.read_only:
            self.root.attrs.update({"backbench_schema_version": SCHEMA_VERSION, "backbench": "feature cache"})
        elif version is not None and int(version) > SCHEMA_VERSION:
            raise CacheError(
                f"cache {self.path!r} was written by a newer backbench (schema {version} > {SCHEMA_VERSION}); "
                f"upgrade backbench"
            )
        self.mode = mode
        if local is not None and not self.read_only:
            from backbench.store.cleanup import clean_staging

            clean_staging(local)  # what an unpack killed half-way left beside the cache

    @property
    def is_url(self) -> bool:
        """True for caches behind a URL (not a local path or ``file://``): no locks, no fast paths."""
        return not self.location.is_local

    def _read_only_message(self, action: str) -> str:
        return (f"cache URL {self.path!r} is read-only ({self.scheme}); "
                f"{action} into a local path or s3://, gs://, memory://")

    def require_writable(self, action: str = "write") -> None:
        """Refuse early, in one line, to write into an ``http(s)://`` cache."""
        if not self.location.writable:
            raise CacheError(self._read_only_message(action))

    def group_path(self, backbone: str, dataset: str, split: str, kind: str = "pooled") -> str:
        """``<backbone-slug>/<dataset>/<split>``; other feature kinds than pooled in ``<split>~<kind>``."""
        path = f"{backbone_slug(backbone)}/{check_name('dataset', dataset)}/{check_name('split', split)}"
        if kind and kind != "pooled":
            from backbench.kinds import split_name

            path = f"{path}{split_name('x', kind)[1:]}"
        return path

    def __contains__(self, key: tuple[str, ...]) -> bool:
        try:
            return self._node(self.group_path(*key)) is not None
        except DamagedGroup:  # there, but unreadable
            return True

    def _node(self, path: str):
        """The zarr node at ``path``, None where there is none; unreadable metadata is a :class:`DamagedGroup`."""
        try:
            return self.root[path]
        except KeyError:
            return None
        except Exception as exc:
            raise DamagedGroup(f"group {path} is damaged: {path}/zarr.json cannot be read ({type(exc).__name__}: "
                               f"{exc}); re-extract it with `backbench extract ... --overwrite`") from None

    def group(self, backbone: str, dataset: str, split: str, kind: str = "pooled") -> FeatureGroup:
        """Open an existing group; unknown keys list what the cache holds."""
        node = self._node(self.group_path(backbone, dataset, split, kind))
        if node is None:
            if kind != "pooled" and (backbone, dataset, split) in self:
                raise GroupNotFound(f"cache {self.path!r} has no {kind!r} features of {dataset}/{split} for "
                                    f"{backbone}; extract them with --features {kind.split(':')[-1]}"
                                    + (f" --layers -{kind.split(':')[0][6:]}" if kind.startswith("layer-") else "")
                                    ) from None
            raise GroupNotFound(self._missing_message(backbone, dataset, split)) from None
        return FeatureGroup(node).check()

    def _missing_message(self, backbone: str, dataset: str, split: str) -> str:
        held = [g for g in self.groups() if g.backbone == backbone and g.dataset == dataset]
        if held:
            splits = ", ".join(sorted(g.split for g in held))
            return f"cache {self.path!r} has no split {split!r} of {dataset} for {backbone} (has: {splits})"
        return (
            f"cache {self.path!r} has no features for {backbone} on {dataset}/{split}; "
            f"run `backbench extract {backbone} --dataset {dataset} --split {split} --data ...` "
            f"or see `backbench ls`"
        )

    def create_group(self, backbone: str, dataset: str, split: str, kind: str = "pooled", **spec: Any) -> FeatureGroup:
        """Create (or replace) a group with its arrays and provenance; see :meth:`FeatureGroup.create`."""
        self.require_writable("extract")
        path = self.group_path(backbone, dataset, split, kind)
        group = FeatureGroup.create(self.root, path, **spec)
        self._add_to_index(path)
        return group

    def _add_to_index(self, path: str) -> None:
        """Record ``path`` in the root's group index (re-read first: another writer may have added one)."""
        import zarr

        fresh = zarr.open_group(self.root.store, mode="r+")
        held = list(fresh.attrs.get(INDEX, []))
        if path not in held:
            fresh.attrs[INDEX] = sorted({*held, path})
        self.root = fresh

    def groups(self, *, bounded: bool = True) -> Iterator[FeatureGroup]:
        """Every feature group, walked three levels deep (never into the results log).

        Groups the store cannot list (plain HTTP without directory listings) come from the
        root's group index. At a URL every name is decoded once (``%40`` is ``@``) and checked
        (:func:`group_path_ok`); unsafe ones are skipped with a warning, never fetched. A
        ``bounded`` listing of a URL cache makes at most ``$BACKBENCH_REMOTE_LIST_REQUESTS``
        (10,000) requests, counting each group's chunk markers; callers that read every chunk
        anyway (merge, verify) pass ``bounded=False``.
        """
        if self.is_url:
            yield from remote_groups(self.root, self.path, self._index(), ListBudget(self.path) if bounded else None)
            return
        seen: set[str] = set()  # every folder walked, readable or not: the index adds only the others
        for group in self._walk(seen):
            yield group
        paths, unsafe = self._index()
        warn_unsafe(self.path, unsafe)
        for path in sorted(set(paths) - seen):
            node = self._node(path)  # None: indexed, then removed (or not part of this copy)
            if node is not None and "backbone" in node.attrs:
                yield FeatureGroup(node)

    def _walk(self, seen: set[str]) -> Iterator[FeatureGroup]:
        """The groups of a local cache, by walking its folders (each path added to ``seen``); a
        group whose metadata cannot be read is skipped with a warning (``backbench verify`` lists
        it: :meth:`damaged`)."""
        bad = []
        for path in self._local_paths():
            seen.add(path)
            try:
                node = self._node(path)
            except DamagedGroup as exc:
                bad.append(str(exc))
                continue
            if node is not None and "backbone" in node.attrs:
                yield FeatureGroup(node)
        for message in bad:
            warnings.warn(message, DamagedWarning, stacklevel=2)

    def _local_paths(self) -> list[str]:
        """``backbone/dataset/split`` folders of a local cache that hold a ``zarr.json``."""
        def dirs(p: Path) -> list[Path]:
            return sorted(e for e in p.iterdir() if e.is_dir() and not e.name.startswith((".", "_")))

        root = self.location.local_path
        return [f"{b.name}/{d.name}/{s.name}" for b in dirs(root) for d in dirs(b) for s in dirs(d)
                if (s / "zarr.json").is_file()]

    def damaged(self) -> list[tuple[str, str]]:
        """(path, problem) of each local group whose own metadata cannot be read."""
        out = []
        for path in [] if self.is_url else self._local_paths():
            try:
                self._node(path)
            except DamagedGroup as exc:
                out.append((path, str(exc)))
        return out

    def _index(self) -> tuple[list[str], list[str]]:
        """The root's group index, each entry decoded once: (safe group paths, the other entries)."""
        raw = self.root.attrs.get(INDEX, [])
        if not isinstance(raw, list):
            return [], [f"{INDEX} (not a list)"]
        checked = [(r, group_path_ok(unquote(r)) if isinstance(r, str) else None) for r in raw]
        return [p for _, p in checked if p is not None], [repr(r) for r, p in checked if p is None]
