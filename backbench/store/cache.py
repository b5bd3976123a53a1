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
from pathlib import Path
from typing import Any, Iterator


from backbench.errors import BackbenchError, CacheError, GroupNotFound, MissingDependency
from backbench.store.group import FeatureGroup

SCHEMA_VERSION = 2  # 2: int64 chunk checksums, raw labels (schema 1 caches still read)
RESULTS = "_results"
INDEX = "backbench_groups"  # root attribute: the group paths, for stores that cannot list
READ_ONLY_SCHEMES = ("http", "https")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "http": "aiohttp", "https": "aiohttp"}


def url_scheme(path: str) -> str | None:
    """``s3`` for ``s3://bucket/x.zarr``; None for a local path (``file://`` URLs are local)."""
    scheme, sep, _ = str(path).partition("://")
    if not sep or scheme.lower() == "file":
        return None
    return scheme.lower()


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


@functools.lru_cache(maxsize=1)
def _static_http():
    """fsspec's HTTP filesystem, reading a 403 as "no such key" as it reads a 404.

    Buckets that serve public files but may not be listed (S3) answer 403 for keys that do not
    exist; zarr asks for such keys (a results record, optional arrays) as a matter of course.
    """
    from fsspec.implementations.http import HTTPFileSystem

    class StaticHTTPFileSystem(HTTPFileSystem):
        def _raise_not_found_for_status(self, response, url):
            if response.status == 403:
                raise FileNotFoundError(url)
            super()._raise_not_found_for_status(response, url)

    return StaticHTTPFileSystem


def _url_store(url: str, scheme: str, read_only: bool, storage_options: dict[str, Any] | None) -> Any:
    """zarr's fsspec store for ``url`` (``http(s)://``: read-only, 403 read as missing)."""
    from zarr.storage import FsspecStore

    if scheme in READ_ONLY_SCHEMES:
        fs = _static_http()(asynchronous=True, **(storage_options or {}))
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
        self.scheme = url_scheme(self.path)
        self.read_only = mode == "r" or self.scheme in READ_ONLY_SCHEMES
        missing = CacheError(f"no feature cache at {self.path!r}; run `backbench extract` first or pass --cache")
        if self.scheme is None:
            local = Path(self.path.removeprefix("file://"))
            if local.exists() and not local.is_dir():
                raise CacheError(f"cache path {self.path!r} is a file; give a folder such as features.zarr")
            if mode in ("r", "r+") and not (local / "zarr.json").exists():
                raise missing
            store: Any = str(local)  # zarr's LocalStore: the fast raw-chunk paths and locks apply
        try:
            if self.scheme is not None:
                _check_filesystem(self.scheme)
                store = _url_store(self.path, self.scheme, self.read_only, storage_options)
            try:
                self.root = zarr.open_group(store, mode="r" if self.read_only else mode)
            except ContainsGroupError:  # another process created the cache between zarr's look and its create
                self.root = zarr.open_group(store, mode="r+")
        except BackbenchError:
            raise
        except (GroupNotFoundError, FileNotFoundError):
            if mode == "a" and self.scheme in READ_ONLY_SCHEMES:
                raise CacheError(self._read_only_message("extract")) from None
            raise missing from None
        except Exception as exc:
            raise CacheError(f"cannot open cache {self.path!r}: {type(exc).__name__}: {exc}") from exc
        version = self.root.attrs.get("backbench_schema_version")
        if version is None and not self.read_only:
            self.root.attrs.update({"backbench_schema_version": SCHEMA_VERSION, "backbench": "feature cache"})
        elif version is not None and int(version) > SCHEMA_VERSION:
            raise CacheError(
                f"cache {self.path!r} was written by a newer backbench (schema {version} > {SCHEMA_VERSION}); "
                f"upgrade backbench"
            )
        self.mode = mode

    @property
    def is_url(self) -> bool:
        """True for caches behind a URL (not a local path or ``file://``): no locks, no fast paths."""
        return self.scheme is not None

    def _read_only_message(self, action: str) -> str:
        return (f"cache URL {self.path!r} is read-only ({self.scheme}); "
                f"{action} into a local path or s3://, gs://, memory://")

    def require_writable(self, action: str = "write") -> None:
        """Refuse early, in one line, to write into an ``http(s)://`` cache."""
        if self.scheme in READ_ONLY_SCHEMES:
            raise CacheError(self._read_only_message(action))

    def group_path(self, backbone: str, dataset: str, split: str, kind: str = "pooled") -> str:
        """``<backbone-slug>/<dataset>/<split>``; other feature kinds than pooled in ``<split>~<kind>``."""
        path = f"{backbone_slug(backbone)}/{check_name('dataset', dataset)}/{check_name('split', split)}"
        if kind and kind != "pooled":
            from backbench.extract.kinds import split_name

            path = f"{path}{split_name('x', kind)[1:]}"
        return path

    def __contains__(self, key: tuple[str, ...]) -> bool:
        try:
            self.root[self.group_path(*key)]
        except KeyError:
            return False
        return True

    def group(self, backbone: str, dataset: str, split: str, kind: str = "pooled") -> FeatureGroup:
        """Open an existing group; unknown keys list what the cache holds."""
        try:
            node = self.root[self.group_path(backbone, dataset, split, kind)]
        except KeyError:
            if kind != "pooled" and (backbone, dataset, split) in self:
                raise GroupNotFound(f"cache {self.path!r} has no {kind!r} features of {dataset}/{split} for "
                                    f"{backbone}; extract them with --features {kind.split(':')[-1]}"
                                    + (f" --layers -{kind.split(':')[0][6:]}" if kind.startswith("layer-") else "")
                                    ) from None
            raise GroupNotFound(self._missing_message(backbone, dataset, split)) from None
        return FeatureGroup(node)

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

    def groups(self) -> Iterator[FeatureGroup]:
        """Every feature group, walked three levels deep (never into the results log).

        Groups the store cannot list (plain HTTP without directory listings) come from the
        root's group index.
        """
        seen: set[str] = set()
        try:
            for group in self._walk():
                seen.add(group.path)
                yield group
        except Exception:
            if not self.is_url:
                raise  # a local cache always lists; an error there is real
        for path in sorted(set(self.root.attrs.get(INDEX, [])) - seen):
            try:
                node = self.root[path]
            except KeyError:  # indexed, then removed (or not part of this copy)
                continue
            if "backbone" in node.attrs:
                yield FeatureGroup(node)

    def _walk(self) -> Iterator[FeatureGroup]:
        for _, b in sorted(self.root.groups()):
            if b.basename == RESULTS:
                continue
            for _, d in sorted(b.groups()):
                for _, s in sorted(d.groups()):
                    if "backbone" in s.attrs:
                        yield FeatureGroup(s)
