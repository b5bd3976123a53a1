"""Where a cache lives: a local folder or an fsspec URL, told apart once, with what it supports.

A local path or ``file://`` URL is a folder on this machine: zarr's local store, locks,
fast raw-chunk reads, staging folders. Anything else (``s3://``, ``gs://``, ``memory://``,
``http(s)://``) goes through fsspec. As zarr's stores answer ``supports_writes`` and
``supports_listing``, a :class:`Location` answers ``is_local``, ``writable`` and
``listable``, so no module looks for ``"://"`` in a string itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

READ_ONLY_SCHEMES = ("http", "https")
_FILE = "file://"


@dataclass(frozen=True)
class Location:
    """A cache's place: ``raw`` as given, ``scheme`` (``"s3"``; None for a local path or ``file://``)."""

    raw: str
    scheme: str | None

    @classmethod
    def of(cls, path: str | os.PathLike) -> Location:
        """Parse a path or URL; ``file://`` URLs are local."""
        raw = str(path)
        scheme, sep, _ = raw.partition("://")
        return cls(raw, None if not sep or scheme.lower() == "file" else scheme.lower())

    @property
    def is_local(self) -> bool:
        """A folder on this machine (locks, staging folders and raw-chunk fast paths apply)."""
        return self.scheme is None

    @property
    def writable(self) -> bool:
        """Whether writes can go there at all (``http(s)://`` caches are read-only)."""
        return self.scheme not in READ_ONLY_SCHEMES

    @property
    def listable(self) -> bool:
        """Whether its folders can be listed reliably (plain HTTP may not list: the root's index says)."""
        return self.scheme not in READ_ONLY_SCHEMES

    @property
    def local_path(self) -> Path | None:
        """The local folder (``file://`` stripped); None at a URL."""
        if not self.is_local:
            return None
        return Path(self.raw[len(_FILE):] if self.raw.lower().startswith(_FILE) else self.raw)

    def folder(self, *parts: str) -> Path | None:
        """The local path of a folder inside the cache (``parts`` below its root); None at a URL."""
        root = self.local_path
        return None if root is None else root.joinpath(*parts)

    @property
    def identity(self) -> str:
        """What two spellings of one cache share: the resolved local path, or the URL without a trailing ``/``."""
        root = self.local_path
        return self.raw.rstrip("/") if root is None else os.path.realpath(root)
