"""Combine caches: ``merge`` copies every group and results record of some caches into one.

Conflicts are found before anything is written: a group (backbone/dataset/split) that two
caches, or a source and the target, hold with different fingerprints (``cache_key``: other
weights, preprocessing, data or dtype) refuses the whole merge. Groups with the same
fingerprint are one group: it is copied once, and where the copies are incomplete the
target gets the union of their finished chunks.

Every chunk is read whole, its checksum recomputed against the one its source stored at
write time, and written through :meth:`FeatureGroup.write_rows` (done markers last, so a
merge that dies half-way leaves finished chunks only, and rerunning it does the rest).

Cached text embeddings (``_text/...``, :mod:`backbench.store.text_groups`) are merged the same
way: a torn copy in a source, or two copies with different fingerprints, refuse the merge.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Any, Callable

import numpy as np

from backbench.errors import CacheError, CacheMismatch
from backbench.store.cache import Cache
from backbench.store.chunks import chunk_checksum
from backbench.store.cleanup import clean_partials
from backbench.store.group import FeatureGroup, group_key
from backbench.store.location import Location
from backbench.store.lock import group_locked, local_folder, locked
from backbench.store.results import ResultsLog, results_groups
from backbench.store.structure import RESULTS
from backbench.store.text_groups import copy_text, refuse_torn, text_groups, text_problem
from backbench.store.verify import refuse_damaged

COPY_BYTES = 64 << 20  # features per write_rows call (a run of whole chunks)
Reader = Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]]


class Rows:
    """Rows that can be copied into a group: a cache group, or datasets of an HDF5 file.

    ``stored`` holds each source chunk's checksum as written (-1: not done) or is None for
    sources without checksums (all rows there, nothing to verify against).
    """

    def __init__(self, name: str, n: int, chunk_rows: int, read: Reader, *, stored: np.ndarray | None = None,
                 algorithm: str | None = None) -> None:
        self.name, self.n, self.chunk_rows, self._read = name, n, max(1, int(chunk_rows)), read
        self.stored, self.algorithm = stored, algorithm

    @classmethod
    def of_group(cls, cache: Cache, group: FeatureGroup) -> Rows:
        """A group's rows; every chunk read is checked against its checksum (:meth:`FeatureGroup.read_chunk`)."""
        stored = group.stored_checksums()

        def read(a: int, b: int):
            chunks = range(a // group.chunk_rows, -(-b // group.chunk_rows))
            parts = [group.read_chunk(c) for c in chunks]
            feats, labels = np.concatenate([f for f, _ in parts]), np.concatenate([y for _, y in parts])
            ids = np.asarray(group.read_span("ids", a, b), dtype=object).astype(str)
            return feats, labels, ids, group.read_span("logits", a, b) if group.has_logits else None

        return cls(f"{group.path} in {cache.path}", group.n, group.chunk_rows, read,
                   stored=stored, algorithm=group.checksum)

    def chunks(self, a: int, b: int) -> range:
        return range(a // self.chunk_rows, -(-b // self.chunk_rows))

    def covers(self, a: int, b: int) -> bool:
        span = self.chunks(a, b)
        return self.stored is None or bool((self.stored[span.start : span.stop] >= 0).all())

    def rows_done(self) -> int:
        if self.stored is None:
            return self.n
        return int(sum(min(self.n, (c + 1) * self.chunk_rows) - c * self.chunk_rows
                       for c in np.flatnonzero(self.stored >= 0)))

    def fetch(self, a: int, b: int):
        """Rows [a, b), read in whole source chunks, each checked against its stored checksum."""
        if self.stored is None:
            return self._read(a, b)
        span = self.chunks(a, b)
        base, end = span.start * self.chunk_rows, min(self.n, span.stop * self.chunk_rows)
        feats, labels, ids, logits = self._read(base, end)
        for c in span:
            s, e = c * self.chunk_rows - base, min(self.n, (c + 1) * self.chunk_rows) - base
            if chunk_checksum(feats[s:e], labels[s:e].astype(np.int64), self.algorithm) != self.stored[c]:
                raise CacheError(f"{self.name}: chunk {c} fails its checksum (changed since it was written); "
                                 f"finished chunks before it were copied; find the damage with `backbench verify`")
        cut = slice(a - base, b - base)
        return feats[cut], labels[cut], ids[cut], None if logits is None else logits[cut]


def fill(target: FeatureGroup, sources: list[Rows], *, max_bytes: int = COPY_BYTES) -> int:
    """Write every chunk ``target`` lacks that one of ``sources`` has (first source first);
    check the target's checksums against the sources'. Returns the chunks written."""
    done = target.done_chunks()
    plan: list[tuple[int, int]] = []  # (target chunk, source index)
    for c in np.flatnonzero(~done).tolist():
        a, b = target.chunk_bounds(c)
        for i, src in enumerate(sources):
            if src.covers(a, b):
                plan.append((c, i))
                break
    dtype = target.array("features").dtype
    per_run = max(1, max_bytes // max(1, target.chunk_rows * target.dim * dtype.itemsize))
    runs: list[list[int]] = []
    for c, i in plan:
        last = runs[-1] if runs else None
        if last and last[0] == i and last[-1] == c - 1 and len(last) - 1 < per_run:
            last.append(c)
        else:
            runs.append([i, c])
    expected: dict[int, int] = {}
    for i, *chunks in runs:
        src = sources[i]
        start, stop = target.chunk_bounds(chunks[0])[0], target.chunk_bounds(chunks[-1])[1]
        feats, labels, ids, logits = src.fetch(start, stop)
        with np.errstate(over="ignore"):  # checked just below
            cast = np.asarray(feats, dtype=dtype)
        if cast.dtype != feats.dtype and np.isinf(cast).any() and not np.isinf(feats).any():
            raise CacheError(f"{src.name}: features reach {float(np.abs(feats).max()):.3g}, beyond {dtype.name}'s "
                             f"range; use --dtype float32")
        same = src.stored is not None and src.chunk_rows == target.chunk_rows and src.algorithm == target.checksum
        for c in chunks:
            a, b = (v - start for v in target.chunk_bounds(c))
            expected[c] = (int(src.stored[c]) if same else
                           chunk_checksum(cast[a:b], labels[a:b].astype(np.int64), target.checksum))
        target.write_rows(chunks[0], cast, labels, ids, logits)
    if expected:
        stored = target.stored_checksums()
        bad = [c for c, digest in expected.items() if stored[c] != digest]
        if bad:
            raise CacheError(f"{target.path}: chunk {bad[0]} was copied but its checksum differs from its "
                             f"source's; check the disk, then rerun to redo it")
    target.finalize()
    return len(expected)


OTHER_KEY = "made with different weights/preprocessing/data"
OTHER_SHAPES = "with other shapes (n, dim, dtype or logits)"


def layout(group: FeatureGroup) -> tuple[int, int, str, int]:
    """``(n, dim, dtype, logit columns)``: what two copies of a group must share to be one group."""
    return group.n, group.dim, group.dtype, group.array("logits").shape[1] if group.has_logits else 0


def check_same(key_a: Any, layout_a: tuple, key_b: Any, layout_b: tuple,
               refuse: Callable[[str], CacheMismatch]) -> None:
    """Two copies of one group (merge's sources, or a cache and what is imported into it) must share
    their fingerprint and layout; else ``refuse(OTHER_KEY or OTHER_SHAPES)`` is raised."""
    if key_a != key_b:
        raise refuse(OTHER_KEY)
    if layout_a != layout_b:
        raise refuse(OTHER_SHAPES)


def conflict(path: str, a: str, b: str, what: str = OTHER_KEY) -> CacheMismatch:
    return CacheMismatch(f"{path} conflicts: {a} and {b} hold it {what} (cache_key differs); merge the others "
                         f"without one of these caches, or rename it (extract or import it under another "
                         f"--dataset or --split); nothing was merged")


def create_like(target: Cache, like: FeatureGroup) -> FeatureGroup:
    """An empty group in ``target`` with the arrays, chunking and attributes of ``like``."""
    a = like.attrs
    if target.group_path(*group_key(a)) != like.path:
        raise CacheError(f"{like.path}: its attributes name another group "
                         f"({a['backbone']} {a['dataset']}/{a['split']}); it cannot be copied by name")
    with locked(local_folder(target.path)):  # Cache.create_group: FeatureGroup.create, plus the root's index
        group = target.create_group(*group_key(a), n=like.n, dim=like.dim,
                                    num_classes=like.array("logits").shape[1] if like.has_logits else 0,
                                    dtype=like.dtype, chunk_rows=like.chunk_rows, attrs=a)
    if group.attrs["cache_key"] != a.get("cache_key", group.attrs["cache_key"]):
        raise CacheError(f"{like.path}: its cache_key does not match its provenance attributes; "
                         f"re-extract it (the attributes were edited)")
    return group


def merge(sources: list[Cache], target: Cache) -> dict[str, Any]:
    """Copy every group and results record of ``sources`` into ``target``; see the module doc.

    Returns ``{"into", "sources", "groups_copied", "groups_present", "incomplete",
    "chunks_copied", "texts_copied", "texts_present", "records_copied", "records_present"}``.
    """
    mine = target.location.identity
    for src in sources:
        if src.location.identity == mine:
            raise CacheError(f"{target.path} is both an input and the target; merge into another cache, "
                             f"e.g. --into all.zarr")
    # ------------------------------------------------------------- plan (reads only)
    found: dict[str, list[tuple[Cache, FeatureGroup]]] = {}
    for src in sources:
        refuse_damaged(src)
        for g in src.groups(bounded=False):  # every chunk is read anyway
            found.setdefault(g.path, []).append((src, g))
    held = {g.path: g for g in target.groups(bounded=False)}
    plan: list[tuple[str, list[tuple[Cache, FeatureGroup]], FeatureGroup | None]] = []
    for path, entries in found.items():
        (c0, g0), key0 = entries[0], entries[0][1].attrs.get("cache_key")
        for c, g in entries[1:]:
            check_same(key0, layout(g0), g.attrs.get("cache_key"), layout(g), partial(conflict, path, c0.path, c.path))
        have = held.get(path)
        if have is not None:
            check_same(have.attrs.get("cache_key"), layout(have), key0, layout(g0),
                       partial(conflict, path, target.path, c0.path))
        plan.append((path, entries, have))
    texts = _plan_texts(sources, target)
    # ------------------------------------------------------------------- copy
    summary: dict[str, Any] = {"into": target.path, "sources": [s.path for s in sources], "groups_copied": [],
                               "groups_present": [], "incomplete": [], "chunks_copied": 0}
    for path, entries, have in plan:
        if have is not None and have.is_complete:
            summary["groups_present"].append(path)
            continue
        rows = [Rows.of_group(c, g) for c, g in entries]
        order = sorted(range(len(rows)), key=lambda i: -rows[i].rows_done())  # most complete first
        with group_locked(target.path, path):  # an extraction or unpack of this group waits, and vice versa
            group = have if have is not None else create_like(target, entries[order[0]][1])
            clean_partials(local_folder(target.path, path))  # chunks a killed merge or extract left half-written
            written = fill(group, [rows[i] for i in order])
        if have is None or written:
            summary["groups_copied"].append(path)
        else:
            summary["groups_present"].append(path)
        summary["chunks_copied"] += written
        if not group.is_complete:
            summary["incomplete"].append({"group": path, "rows_done": group.rows_done(), "n": group.n})
    summary.update(_copy_texts(texts, target))
    summary.update(copy_records(sources, target))
    return summary


TextPlan = list[tuple[str, FeatureGroup, "FeatureGroup | None"]]


def _plan_texts(sources: list[Cache], target: Cache) -> TextPlan:
    """(path, the source copy, the target's copy or None) of every text group of ``sources``;
    torn copies and copies with other fingerprints are refused here, before anything is written."""
    found: dict[str, list[tuple[Cache, FeatureGroup]]] = {}
    for src in sources:
        for g in text_groups(src):
            found.setdefault(g.path, []).append((src, g))
    refuse_torn([g for entries in found.values() for _, g in entries], " and ".join(s.path for s in sources),
                "nothing was merged")
    held = {g.path: g for g in text_groups(target)}
    plan: TextPlan = []
    for path, entries in found.items():
        (c0, g0), have = entries[0], held.get(path)
        others = [(c.path, g) for c, g in entries[1:]] + ([(target.path, have)] if have is not None else [])
        for where, g in others:
            shape = (g.n, g.dim, g.dtype)
            check_same(g0.attrs.get("cache_key"), (g0.n, g0.dim, g0.dtype), g.attrs.get("cache_key"), shape,
                       partial(conflict, path, c0.path, where))
        plan.append((path, g0, have))
    return plan


def _copy_texts(plan: TextPlan, target: Cache) -> dict[str, list[str]]:
    """Copy the planned text groups the target lacks (or holds torn); ``texts_copied``, ``texts_present``."""
    copied, present = [], []
    for path, source, have in plan:
        if have is not None and text_problem(have) is None:
            present.append(path)
            continue
        target.require_writable("merge")
        with group_locked(target.path, path):  # not while a zero-shot run stores the same texts
            copy_text(target, source)
        copied.append(path)
    return {"texts_copied": copied, "texts_present": present}


def copy_records(sources: list[Cache], target: Cache) -> dict[str, int]:
    """Every results record of ``sources`` that ``target`` lacks (same key: same record)."""
    log, copied, present = ResultsLog(target), 0, 0
    for src in sources:
        for name, node in results_groups(src):
            if log.get(name) is not None:
                present += 1
                continue
            record = dict(node.attrs)
            if record.get("key") == name:
                arrays = ResultsLog(src).outcomes(record)  # checked against their SHA-256 on the way
                record.pop("outcomes", None)
                log.put(record, arrays)
            else:  # not keyed as ResultsLog keys them: keep it under its own name
                target.root.create_group(f"{RESULTS}/{name}", overwrite=True, attributes=record)
            copied += 1
    return {"records_copied": copied, "records_present": present}


def merge_caches(paths: list[str], into: str) -> dict[str, Any]:
    """:func:`merge` by paths: the inputs opened read-only, ``into`` created if absent (and
    removed again if the merge is refused before anything was written)."""
    mine = Location.of(into).identity
    for p in paths:
        if Location.of(p).identity == mine:
            raise CacheError(f"--into {into} is also one of the inputs; merge into another cache, "
                             f"e.g. --into all.zarr")
    sources = [Cache(p, mode="r") for p in paths]
    local = Location.of(into).local_path
    fresh = local is not None and not local.exists()
    target = Cache(into)
    try:
        return merge(sources, target)
    except BaseException:
        if fresh and sorted(os.listdir(local)) == ["zarr.json"]:
            shutil.rmtree(local)
        raise
