"""One (backbone, dataset, split) group of the cache: its arrays and its provenance.

What a group holds is what its checksums say: a row chunk is done when its marker in
``chunk_checksum`` holds the CRC of its feature and label bytes, and every read checks the
chunks it returns against those markers. Attributes that describe the arrays (``n``, ``dim``,
``dtype``, ``chunk_rows``, ``n_chunks``) are checked against the arrays' own metadata before
anything is read, so an edited, torn or half-created group is refused, never read.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from backbench.errors import CacheError, DamagedGroup, IncompleteGroup
from backbench.store.chunks import (CHECKSUM, as_crc, chunk_checksum, is_local, missing_chunks, read_rows,
                                    write_rows)
from backbench.store.structure import array_specs, structure_problem

CHUNK_BYTES = 4 << 20  # ~4 MiB of features per row chunk (measured: bench/extract.py)
PROVENANCE_KEYS = ("backbone", "weights_sha256", "preprocess", "feature_kind", "dataset_fingerprint", "dtype")
WRITE_THREADS = 4  # bulk writes: enough to keep a disk busy, measured in bench/extract.py
ARRAYS = ("features", "labels", "ids", "chunk_checksum")  # every group has these; logits is optional


def chunk_rows_for(dim: int, itemsize: int, n: int) -> int:
    """Rows per chunk: about :data:`CHUNK_BYTES` of features, a multiple of 64, at most ``n``."""
    rows = max(64, (CHUNK_BYTES // max(1, dim * itemsize)) // 64 * 64)
    return int(max(1, min(rows, n)))


class FeatureGroup:
    """Typed access to one group. Reading refuses incomplete, damaged or changed groups."""

    def __init__(self, node) -> None:
        self.node = node
        self._arrays: dict[str, Any] = {}
        self._checked = False
        self._markers: np.ndarray | None = None  # the checksums as first read: what chunk reads check against

    def array(self, name: str):
        """An array of the group, opened once (each open reads its metadata)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.node[name]
            except KeyError:
                raise self._damaged(f"its {name} array is missing") from None
            except Exception as exc:
                raise self._damaged(f"{name}/zarr.json cannot be read ({type(exc).__name__}: {exc})") from None
        return self._arrays[name]

    # ------------------------------------------------------------------ create
    @classmethod
    def create(cls, root, path: str, *, n: int, dim: int, num_classes: int = 0, dtype: str = "float16",
               chunk_rows: int | None = None, attrs: dict[str, Any]) -> FeatureGroup:
        np_dtype = np.dtype(dtype)
        rows = int(chunk_rows or chunk_rows_for(dim, np_dtype.itemsize, n))
        n_chunks = -(-n // rows) if n else 0
        meta = {**attrs, "n": n, "dim": dim, "dtype": np_dtype.name, "chunk_rows": rows, "checksum": CHECKSUM,
                "n_chunks": n_chunks, "complete": n == 0, "chunks_complete": []}
        meta["cache_key"] = cache_key(meta)
        node = root.create_group(path, overwrite=True, attributes=meta)
        _create_arrays(node, array_specs(n, dim, num_classes, np_dtype, rows))
        return cls(node)

    # ---------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.node.attrs)

    @property
    def path(self) -> str:
        return self.node.path

    def __getattr__(self, key: str) -> Any:
        if key in ("backbone", "dataset", "split", "n", "dim", "dtype", "chunk_rows", "n_chunks", "classes"):
            try:
                return self.node.attrs[key]
            except KeyError:
                raise self._damaged(f"its attributes lack {key!r}") from None
        raise AttributeError(key)

    @property
    def checksum(self) -> str:
        """The group's chunk checksum algorithm (schema-1 groups: crc32)."""
        return self.node.attrs.get("checksum", "crc32")

    @property
    def has_logits(self) -> bool:
        return "logits" in self.node

    def _damaged(self, detail: str) -> DamagedGroup:
        return DamagedGroup(f"group {self.path} is damaged: {detail}; find all damage with `backbench verify`, "
                            f"then re-extract the group with `backbench extract ... --overwrite`")

    def check(self) -> FeatureGroup:
        """Refuse (:class:`DamagedGroup`) a group whose attributes disagree with its arrays."""
        if self._checked:
            return self
        problem = structure_problem(self) or map_shape_problem(self.attrs)
        if problem:
            raise self._damaged(problem)
        self._checked = True
        return self

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(self.n, start + self.chunk_rows)

    def stored_checksums(self) -> np.ndarray:
        """Each row chunk's checksum as written, -1 where the chunk is not done (or its marker is lost).

        (Caches of schema 1 stored them as hex strings, "" for not done; read the same way.)
        """
        self.check()
        if not self.n_chunks:
            return np.zeros(0, dtype=np.int64)
        arr = self.array("chunk_checksum")
        out = np.full(self.n_chunks, -1, dtype=np.int64)
        if arr.dtype.kind in "iu" and is_local(arr):
            for i in range(self.n_chunks):
                try:
                    read_rows(arr, i, i + 1, out[i : i + 1])
                except (OSError, ValueError):  # no marker, or one torn by a crash: not done
                    out[i] = -1
            return out
        try:
            values = arr[:]
        except Exception:  # a marker torn by a crash: that chunk is not done
            values = np.empty(self.n_chunks, dtype=object)
            for i in range(self.n_chunks):
                try:
                    values[i] = arr[i]
                except Exception:
                    values[i] = -1
        return np.array([as_crc(v) for v in values], dtype=np.int64)

    def done_chunks(self) -> np.ndarray:
        """Boolean mask over row chunks: True where the chunk is written and checksummed."""
        return self.stored_checksums() >= 0

    def rows_done(self) -> int:
        return int(sum(b - a for a, b in map(self.chunk_bounds, np.flatnonzero(self.done_chunks()))))

    @property
    def is_complete(self) -> bool:
        return bool(self.done_chunks().all())

    # ------------------------------------------------------------------- write
    def write_chunk(self, chunk: int, features: np.ndarray, labels: np.ndarray, ids: list[str],
                    logits: np.ndarray | None = None) -> int:
        """Write one whole row chunk, then its checksum (the 'done' marker) last; returns the checksum."""
        start, stop = self.chunk_bounds(chunk)
        feats = np.asarray(features, dtype=self.array("features").dtype)
        if feats.shape != (stop - start, self.dim):
            raise CacheError(f"chunk {chunk} wants {(stop - start, self.dim)} rows, got {feats.shape}")
        write_rows(self.array("features"), start, feats)
        labels = np.asarray(labels, dtype=np.int64)
        write_rows(self.array("labels"), start, labels)
        write_rows(self.array("ids"), start, np.asarray(ids, dtype=object).astype(str))
        if logits is not None and self.has_logits:
            write_rows(self.array("logits"), start, np.asarray(logits, dtype=feats.dtype))
        digest = chunk_checksum(feats, labels, self.checksum)
        write_rows(self.array("chunk_checksum"), chunk, np.array([digest], dtype=np.int64))
        return digest

    def write_rows(self, start_chunk: int, features: np.ndarray, labels: np.ndarray, ids: list[str],
                   logits: np.ndarray | None = None) -> None:
        """Write a run of whole chunks from ``start_chunk`` at once (bulk imports and copies).

        Feature and label chunks go to disk on a few threads (file writes and CRC-32 release
        the GIL) while zarr encodes the logits; the checksums (the 'done' markers) last.
        """
        start = self.chunk_bounds(start_chunk)[0]
        stop = start + len(features)
        chunks = range(start_chunk, start_chunk + -(-len(features) // self.chunk_rows))
        if stop != self.n and (stop - start) % self.chunk_rows:
            raise CacheError(f"write_rows needs whole chunks of {self.chunk_rows} rows (or the last rows)")
        feats = np.asarray(features, dtype=self.array("features").dtype)
        labels = np.asarray(labels, dtype=np.int64)
        bounds = [(a - start, b - start) for a, b in map(self.chunk_bounds, chunks)]
        names = np.asarray(ids, dtype=object).astype(str)
        farr, larr, iarr, algorithm = (self.array("features"), self.array("labels"), self.array("ids"),
                                       self.checksum)

        def one(a: int, b: int) -> int:
            write_rows(farr, start + a, feats[a:b])
            write_rows(larr, start + a, labels[a:b])
            write_rows(iarr, start + a, names[a:b])
            return chunk_checksum(feats[a:b], labels[a:b], algorithm)

        with ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="backbench-write") as pool:
            futures = [pool.submit(one, a, b) for a, b in bounds]
            if logits is not None and self.has_logits:
                larr_ = self.array("logits").with_config({"write_empty_chunks": True})
                larr_[start:stop] = np.asarray(logits, dtype=feats.dtype)
            digests = [f.result() for f in futures]
            marks = self.array("chunk_checksum")
            list(pool.map(lambda c: write_rows(marks, c, np.array([digests[c - chunks.start]], dtype=np.int64)),
                          chunks))

    def finalize(self, extra: dict[str, Any] | None = None) -> None:
        """Record a summary of the markers (``complete``, ``chunks_complete``) for people; never read back."""
        done = self.done_chunks()
        self.node.attrs.update({**(extra or {}), "complete": bool(done.all()),
                                "chunks_complete": _ranges(np.flatnonzero(done))})

    # -------------------------------------------------------------------- read
    def chunks(self, complete_only: bool = False, *, stored: np.ndarray | None = None) -> np.ndarray:
        """The row chunks a read returns: all of them, or (``complete_only``) the finished ones."""
        done = (self.stored_checksums() if stored is None else stored) >= 0
        if not done.all() and not complete_only:
            missing = np.flatnonzero(~done)
            raise IncompleteGroup(
                f"incomplete: {self.rows_done()} of {self.n} rows in {self.path} (chunk {int(missing[0])} "
                f"{'and more ' if len(missing) > 1 else ''}has no checksum); finish it with `backbench extract` "
                f"(or ask for the complete rows only)"
            )
        return np.flatnonzero(done)

    def rows(self, complete_only: bool = False) -> np.ndarray:
        """The row indices a read returns (see :meth:`chunks`)."""
        parts = [np.arange(*self.chunk_bounds(int(c))) for c in self.chunks(complete_only)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one done row chunk, checked against its stored checksum.

        The checksums are read once per :class:`FeatureGroup` (streamed reads come back to
        the same chunks many times); a chunk finished later is seen by a new one.
        """
        if self._markers is None:
            self._markers = self.stored_checksums()
        stored = self._markers[chunk]
        if stored < 0:
            raise IncompleteGroup(f"chunk {chunk} of {self.path} is not done (no checksum); finish it with "
                                  f"`backbench extract`")
        return self._verified(chunk, int(stored))

    def _verified(self, chunk: int, stored: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.chunk_bounds(chunk)
        farr, larr = self.array("features"), self.array("labels")
        feats = np.empty((b - a, self.dim), dtype=farr.dtype)
        labels = np.empty(b - a, dtype=np.int64)
        for arr, out in ((farr, feats), (larr, labels)):
            try:
                read_rows(arr, a, b, out)
            except FileNotFoundError:
                raise self._damaged(f"the file of chunk {chunk} (rows {a}:{b}) of {arr.basename} is missing") from None
        if chunk_checksum(feats, labels, self.checksum) != stored:
            raise self._damaged(f"chunk {chunk} fails its checksum (rows {a}:{b} changed since written)")
        return feats, labels

    def read_labeled(self, *, complete_only: bool = False, dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of the chunks a read returns, each chunk checked against its checksum."""
        stored = self.stored_checksums()
        chunks = self.chunks(complete_only, stored=stored)
        n = sum(b - a for a, b in map(self.chunk_bounds, chunks.tolist()))
        feats = np.empty((n, self.dim), dtype=dtype or self.array("features").dtype)
        labels = np.empty(n, dtype=np.int64)
        at = 0
        for c in chunks.tolist():
            f, y = self._verified(c, int(stored[c]))
            feats[at : at + len(y)], labels[at : at + len(y)] = f, y
            at += len(y)
        return feats, labels

    def read(self, name: str = "features", *, complete_only: bool = False, dtype: Any = None) -> np.ndarray:
        """An array of the group; ``complete_only`` keeps just the finished chunks' rows.

        Features and labels are checked against the chunk checksums; ids and logits must have
        every chunk they claim (a missing one is an error, never fill values).
        """
        if name in ("features", "labels"):
            out = self.read_labeled(complete_only=complete_only, dtype=dtype if name == "features" else None)
            return out[0] if name == "features" else out[1].astype(dtype, copy=False) if dtype else out[1]
        chunks = self.chunks(complete_only).tolist()
        rows = self.rows(complete_only)
        arr = self._present(name, chunks)
        out = arr[:] if len(rows) == self.n else arr.get_orthogonal_selection((rows,))
        self._check_ids(name, out, rows)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def read_span(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of ids or logits (unchecksummed arrays), refusing chunks whose data is missing."""
        arr = self._present(name, list(range(a // self.chunk_rows, -(-b // self.chunk_rows))))
        out = arr[a:b]
        self._check_ids(name, out, np.arange(a, b))
        return out

    def _present(self, name: str, chunks: list[int]):
        """The array ``name``, once every one of ``chunks`` is known to hold data."""
        self.check()
        arr = self.array(name)
        lost = missing_chunks(arr, chunks)
        if lost:
            a, b = self.chunk_bounds(lost[0])
            raise self._damaged(f"the file of chunk {lost[0]} (rows {a}:{b}) of {name} is missing")
        return arr

    def _check_ids(self, name: str, values: np.ndarray, rows: np.ndarray) -> None:
        if name == "ids" and len(values) and (values == "").any():
            raise self._damaged(f"the id of row {int(rows[np.flatnonzero(values == '')[0]])} is empty (lost data)")

    def features(self, **kw: Any) -> np.ndarray:
        return self.read("features", **kw)

    def labels(self, **kw: Any) -> np.ndarray:
        return self.read("labels", **kw)

    def ids(self, **kw: Any) -> np.ndarray:
        return self.read("ids", **kw)

    def logits(self, **kw: Any) -> np.ndarray | None:
        return self.read("logits", **kw) if self.has_logits else None

    def check_files(self, stored: np.ndarray | None = None) -> FeatureGroup:
        """Refuse a local group whose done chunks lack a data file (zarr would read fill values)."""
        done = np.flatnonzero((self.stored_checksums() if stored is None else stored) >= 0).tolist()
        for name in ("features", "labels", "ids", "logits")[: 3 + self.has_logits]:
            if is_local(self.array(name)):
                self._present(name, done)
        return self

    def check_chunks(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Refuse unless each done chunk of these whole-group ``features`` and ``labels`` matches its checksum."""
        stored = self.stored_checksums()
        for c in np.flatnonzero(stored >= 0).tolist():
            a, b = self.chunk_bounds(c)
            if chunk_checksum(features[a:b], np.asarray(labels[a:b], dtype=np.int64), self.checksum) != stored[c]:
                raise self._damaged(f"chunk {c} fails its checksum (rows {a}:{b} changed since written)")

    def summary(self) -> dict[str, Any]:
        """What ``ls`` shows; the markers are read once (one request each at a URL)."""
        stored = self.stored_checksums()
        self.check_files(stored)
        a, done = self.attrs, np.flatnonzero(stored >= 0)
        return {"backbone": a["backbone"], "dataset": a["dataset"], "split": a["split"],
                "features": a.get("feature_kind", "pooled"), "n": a["n"], "dim": a["dim"], "dtype": a["dtype"],
                "rows_done": int(sum(end - start for start, end in map(self.chunk_bounds, done.tolist()))),
                "complete": bool(len(done) == len(stored)), "logits": self.has_logits, "path": self.path}


def _create_arrays(node, arrays: dict[str, dict[str, Any]]) -> None:
    """Create the group's arrays side by side (each writes its own metadata document)."""
    import asyncio

    from zarr.core.sync import sync

    async def create_all() -> None:
        await asyncio.gather(*(node._async_group.create_array(name, **spec) for name, spec in arrays.items()))

    sync(create_all())


def map_shape_problem(attrs: dict[str, Any]) -> str | None:
    """What is wrong with a map group's ``map_shape`` [h, w, d] (each row is the row-major
    (h, w, d) map: h*w*d must be ``dim``), or None; groups of other kinds have none."""
    shape, kind = attrs.get("map_shape"), str(attrs.get("feature_kind") or "pooled")
    if shape is None:
        is_map = kind.split("@")[0].rsplit(":", 1)[-1] == "map"
        return "its attributes lack 'map_shape' (a map kind's [h, w, d])" if is_map else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v >= 1 for v in shape)):
        return f"attribute 'map_shape' is {shape!r}, not [h, w, d]"
    if shape[0] * shape[1] * shape[2] != attrs.get("dim"):
        return f"attribute map_shape={shape} disagrees with dim={attrs.get('dim')!r} (h*w*d = {int(np.prod(shape))})"
    return None


def group_key(attrs: dict[str, Any]) -> tuple[str, str, str, str]:
    """``(backbone, dataset, split, kind)`` of a group's attributes: where it lives in a cache."""
    kind = str(attrs.get("feature_kind") or "pooled")
    return attrs["backbone"], attrs["dataset"], attrs["split"], kind


def cache_key(attrs: dict[str, Any]) -> str:
    """Hash of everything that changes the features (see :data:`PROVENANCE_KEYS`)."""
    payload = json.dumps({k: attrs.get(k) for k in PROVENANCE_KEYS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _ranges(idx: np.ndarray) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]]: half-open runs, compact in JSON attributes."""
    out: list[list[int]] = []
    for i in idx.tolist():
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
