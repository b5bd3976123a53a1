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

import functools
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote

from backbench.errors import (BackbenchError, BackbenchWarning, CacheError, DamagedGroup, DamagedWarning, GroupNotFound,
                              MissingDependency)
from backbench.store.group import FeatureGroup
from backbench.store.location import READ_ONLY_SCHEMES, Location

SCHEMA_VERSION = 2  # 2: int64 chunk checksums, raw labels (schema 1 caches still read)
RESULTS = "_results"
INDEX = "backbench_groups"  # root attribute: the group paths, for stores that cannot list
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_PART = re.compile(r"^[A-Za-z0-9_~+@-][A-Za-z0-9._~+@-]*$")  # one part of a group path: no ".", "..", "%", "/"
LIST_BUDGET_ENV = "BACKBENCH_REMOTE_LIST_REQUESTS"
LIST_BUDGET = 10_000  # requests a listing of a remote cache may make (directory listings, groups, chunk markers)
GROUP_REQUESTS = 4  # a listed group's metadata: its zarr.json and its arrays'
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "http": "aiohttp", "https": "aiohttp"}


def _check_filesystem(scheme: str) -> None:
    """Fail with the pip package to install when fsspec cannot load the scheme's filesystem."""
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = _PACKAGES.get(scheme)
        hint = f"run `pip install {package}`" if package else str(exc)
        raise MissingDependency(f"{scheme}:// caches need {package or 'a package'}: {hint}") from None
    except ValueError:
        raise CacheError(f"fsspec knows no {scheme}:// filesystem; use a local path or s3://, gs://, "
                         f"memory://, https://") from None


def inside(url: str, root: str) -> bool:
    """True when ``url`` names ``root`` or a key below it: same scheme, host and port, a path under
    root's, and no ``.``/``..`` part, backslash or leftover escape once decoded."""
    import yarl

    raw, base = yarl.URL(url, encoded=False), yarl.URL(root.rstrip("/"), encoded=False)
    parts = unquote(url.split("?", 1)[0].split("#", 1)[0]).split("/")[3:]  # after scheme://host/
    if any(p in (".", "..") or "\\" in p or "%" in p for p in parts):
        return False
    same = (raw.scheme, raw.host, raw.port) == (base.scheme, base.host, base.port)
    return same and (raw.path == base.path or raw.path.startswith(base.path.rstrip("/") + "/"))


@functools.lru_cache(maxsize=1)
def _static_http():
    """fsspec's HTTP filesystem for one cache: a 403 read as "no such key" (as a 404 is), and no
    request outside the cache's URL.

    Buckets that serve public files but may not be listed (S3) answer 403 for keys that do not
    exist; zarr asks for such keys (a results record, optional arrays) as a matter of course.
    Every request passes :meth:`encode_url`, so a name from a hostile listing or index
    (``..``, ``%2e%2e``, another host) is refused there, before it is fetched.
    """
    from fsspec.implementations.http import HTTPFileSystem

    class StaticHTTPFileSystem(HTTPFileSystem):
        def __init__(self, *args: Any, cache_root: str, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.cache_root = cache_root

        def encode_url(self, url):
            if not inside(str(url), self.cache_root):
                raise CacheError(f"refusing to fetch {str(url)!r}: outside the cache at {self.cache_root!r} "
                                 f"(a name in its listing or index points elsewhere)")
            return super().encode_url(url)

        def _raise_not_found_for_status(self, response, url):
            if response.status == 403:
                raise FileNotFoundError(url)
            super()._raise_not_found_for_status(response, url)

    return StaticHTTPFileSystem


def _url_store(url: str, scheme: str, read_only: bool, storage_options: dict[str, Any] | None) -> Any:
    """zarr's fsspec store for ``url`` (``http(s)://``: read-only, 403 read as missing, no request outside it)."""
    from zarr.storage import FsspecStore

    if scheme in READ_ONLY_SCHEMES:
        fs = _static_http()(asynchronous=True, cache_root=url.rstrip("/"), **(storage_options or {}))
        return FsspecStore(fs=fs, path=url.rstrip("/"), read_only=True)
    return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


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
                _check_filesystem(self.scheme)
                store = _url_store(self.path, self.scheme, self.read_only, storage_options)
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
            yield from self._remote_groups(_Budget(self.path) if bounded else None)
            return
        seen: set[str] = set()
        for group in self._walk():
            seen.add(group.path)
            yield group
        paths, unsafe = self._index()
        _warn_unsafe(self.path, unsafe)
        for path in sorted(set(paths) - seen - {p for p, _ in self.damaged()}):
            node = self._node(path)  # None: indexed, then removed (or not part of this copy)
            if node is not None and "backbone" in node.attrs:
                yield FeatureGroup(node)

    def _walk(self) -> Iterator[FeatureGroup]:
        """The groups of a local cache, by walking its folders; a group whose metadata cannot be
        read is skipped with a warning (``backbench verify`` lists it: :meth:`damaged`)."""
        bad = []
        for path in self._local_paths():
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

    def _remote_groups(self, budget: _Budget | None) -> Iterator[FeatureGroup]:
        """Groups of a URL cache: listed (where the store lists) plus indexed, each name checked,
        the requests counted against ``budget`` before they are made."""
        unsafe: list[str] = []
        listed = self._listed(budget, unsafe)
        indexed, bad = self._index()
        paths = sorted({*listed, *indexed})
        _warn_unsafe(self.path, unsafe + bad)
        if budget is not None:
            budget.spend(GROUP_REQUESTS * len(paths), f"its {len(paths)} group(s)")
        for path in paths:
            try:
                node = self.root[path]
            except KeyError:
                continue
            if "backbone" not in node.attrs:
                continue
            group = FeatureGroup(node)
            if budget is not None:
                budget.spend(_marker_count(group), f"group {path}'s chunk markers")
            yield group

    def _listed(self, budget: _Budget | None, unsafe: list[str]) -> list[str]:
        """Group paths from the store's own listing, three levels deep; [] where it cannot list."""
        level = [""]
        for depth in range(3):
            found = []
            for prefix in level:
                if budget is not None:
                    budget.spend(1, "its directory listings")
                for raw in _list_dir(self.root.store, prefix):
                    name = unquote(raw.strip("/"))
                    if name == "zarr.json" or (depth == 0 and name == RESULTS):
                        continue
                    if _PART.match(name):
                        found.append(f"{prefix}/{name}".lstrip("/"))
                    elif _looks_unsafe(name):
                        unsafe.append(repr(f"{prefix}/{raw}".lstrip("/")))
            level = found
        return level


class _Budget:
    """Requests a listing of a remote cache may still make; spending past it is a one-line error."""

    def __init__(self, where: str) -> None:
        try:
            self.limit = int(os.environ.get(LIST_BUDGET_ENV, LIST_BUDGET))
        except ValueError:
            raise CacheError(f"${LIST_BUDGET_ENV} must be a whole number of requests, e.g. 10000") from None
        self.left, self.where = self.limit, where

    def spend(self, n: int, what: str) -> None:
        self.left -= n
        if self.left < 0:
            raise CacheError(f"listing {self.where} would take more than {self.limit} requests ({what} alone: "
                             f"{n}); name a group directly, copy the cache to a local disk, or raise "
                             f"${LIST_BUDGET_ENV}")


def group_path_ok(path: str) -> str | None:
    """``path`` if it is a group path inside a cache (three parts of letters, digits and
    ``. _ ~ + @ -``, none empty, none starting with ``.``, not the results log), else None."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] == RESULTS or not all(_PART.match(p) for p in parts):
        return None
    return path


def _looks_unsafe(name: str) -> bool:
    """A listed name that tries to leave its folder (rather than a stray file such as README.md)."""
    return (name in (".", "..") or "/" in name or "\\" in name or "%" in name or ":" in name
            or not name.strip())


def _warn_unsafe(where: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(f"{where}: ignored {len(names)} name(s) that are not group paths inside the cache: {shown}",
                      BackbenchWarning, stacklevel=3)


def _list_dir(store: Any, prefix: str) -> list[str]:
    """The names directly under ``prefix`` in a zarr store; [] when the store cannot list there."""
    from zarr.core.sync import sync

    async def names() -> list[str]:
        return [n async for n in store.list_dir(prefix)]

    try:
        return sync(names())
    except BackbenchError:
        raise
    except Exception:  # no listings (a 403/404 or an error page): the index says what is there
        return []


def _marker_count(group: FeatureGroup) -> int:
    """Chunk markers a listing reads for ``group``: its markers array's length or its claimed n_chunks."""
    claimed = group.node.attrs.get("n_chunks")
    try:
        length = int(group.array("chunk_checksum").shape[0])
    except Exception:  # no markers array: the group's readers say so
        length = 0
    return max(length, claimed if isinstance(claimed, int) and not isinstance(claimed, bool) else 0)
