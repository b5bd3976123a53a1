"""Caches at URLs: zarr's fsspec store for one, and a bounded, checked listing of its groups.

A remote cache is untrusted input that costs a request per look. Every name it lists, or
that its root index holds, is decoded once and checked (:func:`group_path_ok`); unsafe ones
are skipped with a warning, never fetched. ``http(s)://`` caches read through a filesystem
that refuses any request outside the cache's URL (:func:`inside`) and reads a 403 as "no
such key". A listing counts its requests against a :class:`ListBudget` before making them.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Iterator
from urllib.parse import unquote

from backbench.errors import BackbenchError, BackbenchWarning, CacheError, MissingDependency, require
from backbench.store.group import FeatureGroup
from backbench.store.location import READ_ONLY_SCHEMES
from backbench.store.structure import RESULTS, part_ok

LIST_BUDGET_ENV = "BACKBENCH_REMOTE_LIST_REQUESTS"
LIST_BUDGET = 10_000  # requests a listing of a remote cache may make (directory listings, groups, chunk markers)
GROUP_REQUESTS = 4  # a listed group's metadata: its zarr.json and its arrays'
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "http": "aiohttp", "https": "aiohttp"}


def check_filesystem(scheme: str) -> None:
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
    yarl = require("yarl", extra="remote")

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


def url_store(url: str, scheme: str, read_only: bool, storage_options: dict[str, Any] | None) -> Any:
    """zarr's fsspec store for ``url`` (``http(s)://``: read-only, 403 read as missing, no request outside it)."""
    from zarr.storage import FsspecStore

    if scheme in READ_ONLY_SCHEMES:
        fs = _static_http()(asynchronous=True, cache_root=url.rstrip("/"), **(storage_options or {}))
        return FsspecStore(fs=fs, path=url.rstrip("/"), read_only=True)
    return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


class ListBudget:
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


def remote_groups(root: Any, where: str, indexed: tuple[list[str], list[str]],
                  budget: ListBudget | None) -> Iterator[FeatureGroup]:
    """Groups of the URL cache at ``root``: listed (where the store lists) plus ``indexed`` (the
    root index's safe paths and its other entries), each name checked, the requests counted
    against ``budget`` before they are made."""
    unsafe: list[str] = []
    listed = _listed(root.store, budget, unsafe)
    paths = sorted({*listed, *indexed[0]})
    warn_unsafe(where, unsafe + indexed[1])
    if budget is not None:
        budget.spend(GROUP_REQUESTS * len(paths), f"its {len(paths)} group(s)")
    for path in paths:
        try:
            node = root[path]
        except KeyError:
            continue
        if "backbone" not in node.attrs:
            continue
        group = FeatureGroup(node)
        if budget is not None:
            budget.spend(_marker_count(group), f"group {path}'s chunk markers")
        yield group


def _listed(store: Any, budget: ListBudget | None, unsafe: list[str]) -> list[str]:
    """Group paths from the store's own listing, three levels deep; [] where it cannot list."""
    level = [""]
    for depth in range(3):
        found = []
        for prefix in level:
            if budget is not None:
                budget.spend(1, "its directory listings")
            for raw in _list_dir(store, prefix):
                name = unquote(raw.strip("/"))
                if name == "zarr.json" or (depth == 0 and name == RESULTS):
                    continue
                if part_ok(name):
                    found.append(f"{prefix}/{name}".lstrip("/"))
                elif _looks_unsafe(name):
                    unsafe.append(repr(f"{prefix}/{raw}".lstrip("/")))
        level = found
    return level


def _looks_unsafe(name: str) -> bool:
    """A listed name that tries to leave its folder (rather than a stray file such as README.md)."""
    return (name in (".", "..") or "/" in name or "\\" in name or "%" in name or ":" in name
            or not name.strip())


def warn_unsafe(where: str, names: list[str]) -> None:
    """One warning naming the entries of a listing or index that are not group paths (none: no warning)."""
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
