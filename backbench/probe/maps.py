"""Cached feature maps as a lazy (n, h, w, d) float32 array, for the dense probes.

A map group (feature kind ``map`` or ``layer-N:map``) stores each image's (h, w, d) map as one
row of h*w*d features, row-major, with the group attribute ``map_shape``. :class:`MapArray`
reads only the row chunks a slice needs, each checked against its checksum (as every read
of the cache), so a dense probe can stream maps larger than memory; a numpy (n, h, w, d)
array works in its place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backbench.errors import ProbeInputError
from backbench.store.cache import Cache
from backbench.store.group import FeatureGroup

KEEP_CHUNKS = 2  # row chunks held decoded: a batch that straddles a chunk boundary reads each once


class MapArray:
    """A map group's features as ``(n, h, w, d)`` float32: ``len``, ``shape``, and indexing by an
    int, a slice or an array of row numbers, reading row chunks as needed.

    ``input_size`` is the (H, W) of the model input the maps were computed from: the whole
    image resized to it (``resize`` "full"), so map cell (i, j) covers the original image's
    pixels scaled by (H_orig / h, W_orig / w).
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, group: FeatureGroup) -> None:
        group.check()
        attrs = group.attrs
        shape = attrs.get("map_shape")
        if shape is None:
            raise ProbeInputError(f"{group.path} holds {attrs.get('feature_kind', 'pooled')!r} features, not a map; "
                                  f"extract them with --features map")
        self.group = group
        self.chunk_rows = int(group.chunk_rows)
        group.chunks()  # every chunk done, else IncompleteGroup says how to finish it
        h, w, d = (int(v) for v in shape)
        self.shape = (int(group.n), h, w, d)
        pre = attrs.get("preprocess", {})
        self.input_size = tuple(int(v) for v in pre.get("input_size", (0, 0, 0))[1:])
        self.resize = str(pre.get("resize", "crop"))
        self._held: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"MapArray({self.group.path!r}, shape={self.shape})"

    def _chunk(self, c: int) -> np.ndarray:
        """Row chunk ``c`` as (rows, h, w, d) float32, checked against its checksum and for NaN/inf."""
        if c not in self._held:
            feats, _ = self.group.read_chunk(c)
            if not np.isfinite(feats).all():
                a, b = self.group.chunk_bounds(c)
                raise ProbeInputError(f"{self.group.path} has NaN or infinite values in rows {a}:{b}; "
                                      f"re-extract it (with --dtype float32 if float16 overflowed)")
            while len(self._held) >= KEEP_CHUNKS:
                self._held.pop(next(iter(self._held)))
            self._held[c] = feats.astype(np.float32).reshape(-1, *self.shape[1:])
        return self._held[c]

    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} of {n}")
            return self._chunk(i // self.chunk_rows)[i % self.chunk_rows].copy()
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._span(start, max(start, stop))
            rows = np.arange(start, stop, step)
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            if rows.ndim != 1 or rows.dtype.kind not in "iu":
                raise IndexError("index a MapArray by an int, a slice or a 1-D array of row numbers")
            rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"row numbers outside 0..{n - 1}")
        return self._rows(rows)

    def _span(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b), chunk by chunk."""
        out = np.empty((b - a, *self.shape[1:]), dtype=np.float32)
        r = self.chunk_rows
        for c in range(a // r, -(-b // r)):
            lo, hi = max(a, c * r), min(b, (c + 1) * r)
            out[lo - a: hi - a] = self._chunk(c)[lo - c * r: hi - c * r]
        return out

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Any rows, in the order asked, reading each chunk they touch once."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
        chunks = rows // self.chunk_rows
        for c in np.unique(chunks).tolist():
            at = np.flatnonzero(chunks == c)
            out[at] = self._chunk(c)[rows[at] - c * self.chunk_rows]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def open_maps(cache: Cache, backbone: str, dataset: str, split: str, kind: str = "map") -> MapArray:
    """The :class:`MapArray` of a cached map kind (``map``, ``layer-4:map``)."""
    return MapArray(cache.group(backbone, dataset, split, kind))
