"""Verify a cache: recompute each written chunk's checksum against the one stored at write time."""

from __future__ import annotations

from typing import Any

import numpy as np

from backbench.store.cache import Cache
from backbench.store.group import chunk_checksum


def verify(cache: Cache) -> tuple[list[dict[str, Any]], int]:
    """(problems, chunks checked): a problem is a chunk whose data changed or cannot be read."""
    problems, checked = [], 0
    for group in cache.groups():
        stored = group.stored_checksums()
        for chunk in np.flatnonzero(stored >= 0):
            a, b = group.chunk_bounds(int(chunk))
            checked += 1
            entry = {"group": group.path, "chunk": int(chunk), "rows": f"{a}:{b}"}
            try:
                digest = chunk_checksum(group.node["features"][a:b], group.node["labels"][a:b].astype(np.int64),
                                        group.checksum)
            except Exception as exc:
                problems.append({**entry, "status": "unreadable", "detail": f"{type(exc).__name__}: {exc}"})
                continue
            if digest != stored[chunk]:
                problems.append({**entry, "status": "changed", "detail": "checksum differs from the one written"})
    return problems, checked
