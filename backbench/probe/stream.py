"""Caches bigger than memory: a group's features as a lazy float32 matrix read chunk by chunk.

:class:`GroupRows` looks like a 2-D array to the probes (``shape``, ``len``, row slices and
sorted index arrays), but holds only the row numbers it covers; rows come from the cache's
row chunks when asked for, one chunk at a time. The probe's L-BFGS, the OOD scorers and the
kNN search run over it in blocks, so memory stays flat as a cache grows (see
``bench/scale.py``). :func:`streamed_search` is faiss's out-of-core recipe: one exact index
per gallery chunk, top-k merged in a :class:`faiss.ResultHeap`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import numpy as np

from backbench.errors import BackbenchError, ProbeInputError
from backbench.probe.blocks import ChunkedRows


def parse_size(text: str | int | float | None) -> int | None:
    """``"2GB"``, ``"500M"``, ``"1.5 GiB"``, ``"0"`` or a number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise BackbenchError(f"--memory-limit {text!r}: give a size such as 8GB, 500MB or 0 (always stream)")
    power = " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * 1024**power)


def default_memory_limit(fraction: float = 0.5) -> int:
    """Half of the memory available now: above it the probes stream (``--memory-limit``)."""
    import psutil

    return int(fraction * psutil.virtual_memory().available)


def resolve_memory_limit(limit: str | int | None = None) -> int:
    """The limit in bytes: ``limit`` (``"8GB"``, a number, ``0`` = always stream), else
    ``$BACKBENCH_MEMORY_LIMIT``, else half of the memory available now."""
    if limit is not None:
        return int(parse_size(limit))
    env = os.environ.get("BACKBENCH_MEMORY_LIMIT")
    return parse_size(env) if env else default_memory_limit()


class GroupRows(ChunkedRows):
    """Rows of one or more cache groups as a lazy float32 matrix (``parts``: group, row numbers)."""

    dtype = np.dtype(np.float32)
    ndim = 2
    device = "cpu"

    def __init__(self, parts: list[tuple[Any, np.ndarray]]) -> None:
        self.parts = [(g, np.asarray(r, dtype=np.int64)) for g, r in parts]
        self.offsets = np.cumsum([0] + [len(r) for _, r in self.parts])
        self.shape = (int(self.offsets[-1]), int(self.parts[0][0].dim))
        self._cached: tuple[int, int, np.ndarray] | None = None  # (part, chunk, float32 rows)

    @classmethod
    def of(cls, group, rows: np.ndarray) -> GroupRows:
        return cls([(group, rows)])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def subset(self, positions: np.ndarray) -> GroupRows:
        """The rows at sorted ``positions`` (still lazy)."""
        positions = np.asarray(positions, dtype=np.int64)
        parts = []
        for p, (g, rows) in enumerate(self.parts):
            a, b = self.offsets[p], self.offsets[p + 1]
            sel = positions[(positions >= a) & (positions < b)] - a
            if len(sel):
                parts.append((g, rows[sel]))
        return GroupRows(parts).on(self.device)

    def concat(self, other: GroupRows) -> GroupRows:
        return GroupRows(self.parts + other.parts).on(self.device)

    def on(self, device: Any) -> GroupRows:
        """The same rows, handed to torch on ``device`` (each chunk copied there as it is read)."""
        out = GroupRows(self.parts)
        out.device = str(device)
        return out

    def _chunk(self, part: int, chunk: int) -> np.ndarray:
        """One row chunk of a part's group as float32 (the last one read is kept)."""
        if self._cached is not None and self._cached[:2] == (part, chunk):
            return self._cached[2]
        group = self.parts[part][0]
        a, b = group.chunk_bounds(chunk)
        raw = group.read_chunk(chunk)[0]  # checked against the chunk's checksum
        import torch

        out = torch.from_numpy(raw).float().numpy()  # torch's float16 conversion is vectorized
        if not np.isfinite(out).all():
            raise ProbeInputError(f"{group.path}: rows {a}:{b} hold NaN or inf features; re-extract it with "
                                  f"--overwrite (with --dtype float32 if float16 overflowed)")
        self._cached = (part, chunk, out)
        return out

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.shape[1]), dtype=np.float32)
        for p, (g, rows) in enumerate(self.parts):
            a, b = self.offsets[p], self.offsets[p + 1]
            mine = np.flatnonzero((positions >= a) & (positions < b))
            if not len(mine):
                continue
            absolute = rows[positions[mine] - a]
            chunks = absolute // g.chunk_rows
            for c in np.unique(chunks):
                sel = mine[chunks == c]
                out[sel] = self._chunk(p, int(c))[absolute[chunks == c] - c * g.chunk_rows]
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # X[rows, cols]
            return self[key[0]][(slice(None),) + key[1:]]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self._gather(key.astype(np.int64))

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first position, float32 rows)`` per stored chunk, in order: one pass over the cache."""
        for p, (g, rows) in enumerate(self.parts):
            if not len(rows):
                continue
            chunks = rows // g.chunk_rows
            bounds = np.flatnonzero(np.diff(chunks)) + 1
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
                c = int(chunks[lo])
                first, last = int(rows[lo]) - c * g.chunk_rows, int(rows[hi - 1]) - c * g.chunk_rows
                data = self._chunk(p, c)
                part = data[first : last + 1] if last - first == hi - lo - 1 else data[rows[lo:hi] - c * g.chunk_rows]
                yield int(self.offsets[p] + lo), part


def streamed_search(gallery: GroupRows, queries: np.ndarray, k: int, *, normalize: bool = True,
                    device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries`` (float32, normalized by the caller) over
    the gallery's rows, one gallery chunk in memory at a time: ``(sims, positions)``."""
    from backbench.probe.search import import_faiss, l2_normalize, to_device

    faiss = import_faiss()
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, rows in gallery.blocks():
        rows = l2_normalize(rows.copy()) if normalize else rows
        index = to_device(faiss.IndexFlatIP(rows.shape[1]), device)
        index.add(rows)
        sims, idx = index.search(queries, min(k, len(rows)))
        heap.add_result(sims, np.where(idx >= 0, idx + start, -1))
    heap.finalize()
    return heap.D, heap.I
