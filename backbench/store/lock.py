"""Advisory locks between processes sharing a local cache (fcntl.flock on folders).

Locks are taken on folders whose inode never changes (zarr replaces its ``zarr.json`` files
atomically, so those would make poor locks): the cache root while a group is created, and a
group's own lock folder, ``_locks/<hash of the group path>``, for as long as the group is
extracted, replaced (``--overwrite``), filled by ``merge`` or moved in by ``unpack``. The
lock folder lives outside the group, so replacing the group does not replace its lock, and
each lock folder is an empty zarr group, so the cache stays a clean zarr hierarchy.
Remote caches (URLs) are not locked: writers to one use ``--shard`` so they never share a
chunk, and only shard 0 creates a group there (see :func:`backbench.extract.run.extract`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from backbench.store.cleanup import partial_name
from backbench.store.location import Location

LOCKS = "_locks"
_GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})


@contextmanager
def locked(path: str | Path | None, on_wait: Callable[[], None] | None = None, *,
           shared: bool = False) -> Iterator[None]:
    """Hold a lock on ``path`` (exclusive, or ``shared`` with other shared holders);
    ``on_wait`` is called once if another holder blocks us."""
    if path is None or not Path(path).exists():
        yield
        return
    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, kind)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def local_folder(cache_path: str, *parts: str) -> Path | None:
    """The local path of a folder inside the store (``parts`` below its root), or None for remote stores."""
    return Location.of(cache_path).folder(*parts)


def group_lock_folder(cache_path: str, group_path: str) -> Path | None:
    """The lock folder of ``group_path`` in a local cache (made if absent), or None for remote stores."""
    root = local_folder(cache_path)
    if root is None or not root.is_dir():
        return None
    folder = root / LOCKS / hashlib.sha256(group_path.strip("/").encode()).hexdigest()[:24]
    for f in (folder.parent, folder):
        f.mkdir(exist_ok=True)
        meta = f / "zarr.json"
        if not meta.exists():
            tmp = partial_name(meta)  # per process and thread: two writers never share it
            tmp.write_text(_GROUP_JSON)
            os.replace(tmp, meta)
    return folder


@contextmanager
def group_locked(cache_path: str, group_path: str, on_wait: Callable[[], None] | None = None, *,
                 shared: bool = False) -> Iterator[None]:
    """Hold the lock of one group of a local cache (no lock at URLs); see the module doc."""
    with locked(group_lock_folder(cache_path, group_path), on_wait, shared=shared):
        yield
