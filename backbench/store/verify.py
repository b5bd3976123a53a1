"""Verify a cache: every group's structure, and each written chunk against the checksum stored at write time."""

from __future__ import annotations

from typing import Any

import numpy as np

from backbench.errors import DamagedGroup
from backbench.store.cache import Cache
from backbench.store.chunks import chunk_checksum, missing_chunks, read_rows


def verify(cache: Cache) -> tuple[list[dict[str, Any]], int]:
    """(problems, chunks checked).

    A problem is a group whose metadata cannot be read or disagrees with its arrays
    ("damaged"), a chunk whose data changed, is missing or cannot be read, or a chunk whose
    checksum marker is gone from a group that extraction had recorded as complete ("lost":
    the group now reads as incomplete, and its data may have been rewritten). A group still
    being extracted is no problem (see :func:`incomplete`). One bad group never stops the
    others from being checked.
    """
    problems = [{"group": path, "chunk": None, "rows": "", "status": "damaged", "detail": detail}
                for path, detail in cache.damaged()]
    checked = 0
    for group in cache.groups(bounded=False):
        try:
            stored = group.check().stored_checksums()
        except DamagedGroup as exc:
            problems.append({"group": group.path, "chunk": None, "rows": "", "status": "damaged", "detail": str(exc)})
            continue
        if group.attrs.get("complete") is True:
            for chunk in np.flatnonzero(stored < 0).tolist():
                a, b = group.chunk_bounds(chunk)
                problems.append({"group": group.path, "chunk": chunk, "rows": f"{a}:{b}", "status": "lost",
                                 "detail": "its checksum marker is gone although the group was complete; "
                                           "re-extract the group with --overwrite"})
        for chunk in np.flatnonzero(stored >= 0).tolist():
            checked += 1
            problem = _check_chunk(group, chunk, int(stored[chunk]))
            if problem:
                a, b = group.chunk_bounds(chunk)
                problems.append({"group": group.path, "chunk": chunk, "rows": f"{a}:{b}", **problem})
    return problems, checked


def incomplete(cache: Cache) -> list[dict[str, Any]]:
    """Groups with chunks that have no checksum yet: ``{"group", "rows_done", "n"}`` each."""
    out = []
    for group in cache.groups(bounded=False):
        try:
            done = group.check().rows_done()
        except DamagedGroup:
            continue  # reported by verify
        if done < group.n:
            out.append({"group": group.path, "rows_done": done, "n": group.n})
    return out


def refuse_damaged(cache: Cache) -> None:
    """Refuse a whole-cache copy (export, pack, merge) while one of its groups' metadata cannot be read."""
    damaged = cache.damaged()
    if damaged:
        raise DamagedGroup(damaged[0][1])


def _check_chunk(group, chunk: int, stored: int) -> dict[str, str] | None:
    a, b = group.chunk_bounds(chunk)
    feats = np.empty((b - a, group.dim), dtype=group.array("features").dtype)
    labels = np.empty(b - a, dtype=np.int64)
    try:
        for name, out in (("features", feats), ("labels", labels)):
            read_rows(group.array(name), a, b, out)
        lost = [name for name in ("ids", "logits")[: 1 + group.has_logits]
                if missing_chunks(group.array(name), [chunk])]
    except FileNotFoundError:
        return {"status": "missing", "detail": f"the {name} file of this chunk is missing"}
    except Exception as exc:
        return {"status": "unreadable", "detail": f"{type(exc).__name__}: {exc}"}
    if lost:
        return {"status": "missing", "detail": f"the {lost[0]} file of this chunk is missing"}
    if chunk_checksum(feats, labels, group.checksum) != stored:
        return {"status": "changed", "detail": "checksum differs from the one written"}
    return None
