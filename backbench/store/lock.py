"""Advisory locks between processes sharing a local cache (fcntl.flock, no extra files).

A lock is taken on a directory of the store, whose inode never changes (zarr replaces its
``zarr.json`` files atomically, so those would make poor locks): the cache root while a
group is created, the group's ``features`` folder while it is extracted. Remote caches
(URLs) are not locked: writers to one use ``--shard`` so they never share a chunk, and only
shard 0 creates a group there (see :func:`backbench.extract.run.extract`).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def locked(path: str | Path | None, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path``; ``on_wait`` is called once if another holder blocks us."""
    if path is None or not Path(path).exists():
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def local_file(cache_path: str, *parts: str) -> Path | None:
    """The local path of a folder inside the store, or None for remote stores."""
    if "://" in cache_path and not cache_path.startswith("file://"):
        return None
    return Path(cache_path.removeprefix("file://"), *parts)
