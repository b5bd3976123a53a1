"""One (backbone, dataset, split) group of the cache: its arrays and its provenance."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from backbench.errors import CacheError, IncompleteGroup

CHUNK_BYTES = 4 << 20  # ~4 MiB of features per row chunk (measured: bench/extract.py)
PROVENANCE_KEYS = ("backbone", "weights_sha256", "preprocess", "feature_kind", "dataset_fingerprint", "dtype")


def chunk_rows_for(dim: int, itemsize: int, n: int) -> int:
    """Rows per chunk: about :data:`CHUNK_BYTES` of features, a multiple of 64, at most ``n``."""
    rows = max(64, (CHUNK_BYTES // max(1, dim * itemsize)) // 64 * 64)
    return int(max(1, min(rows, n)))


WRITE_THREADS = 4  # bulk writes: enough to keep a disk busy, measured in bench/extract.py
CHECKSUM = "crc32c"  # integrity, not security: hardware CRC-32C (zarr's own dependency), ~15 GB/s


def _bytes(a: np.ndarray) -> np.ndarray:
    view = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    view.flags.writeable = False  # google_crc32c takes read-only buffers
    return view


def chunk_checksum(features: np.ndarray, labels: np.ndarray, algorithm: str = CHECKSUM) -> int:
    """CRC of the chunk's feature bytes, then its label bytes: CRC-32C, or CRC-32 (zlib) for schema-1 groups."""
    if algorithm == "crc32":
        return zlib.crc32(_bytes(labels), zlib.crc32(_bytes(features)))
    import google_crc32c

    return google_crc32c.extend(google_crc32c.value(_bytes(features)), _bytes(labels))


def raw_chunk_file(arr, chunk: int) -> Path | None:
    """The file of row chunk ``chunk`` when it is stored raw on a local disk, else None.

    Uncompressed little-endian chunks hold exactly the C-order bytes of the (full-size)
    chunk, so they can be read into, or written from, a numpy buffer with no zarr codec
    pipeline in between: the same bytes zarr reads and writes, at ``.npy`` speed.
    """
    return _chunk_file(arr, chunk) if _raw_layout(arr) == "bytes" else None


def _is_local(arr) -> bool:
    """True for an array in a local folder; others (fsspec stores at URLs) always go through zarr."""
    from zarr.storage import LocalStore

    return isinstance(arr.store_path.store, LocalStore)


def _raw_layout(arr) -> str | None:
    """"bytes" (plain native-endian), "vlen-utf8" (uncompressed strings) or None, for a local array."""
    from zarr.codecs import BytesCodec, VLenUTF8Codec

    codecs = arr.metadata.codecs
    if not _is_local(arr) or len(codecs) != 1:
        return None
    if isinstance(codecs[0], VLenUTF8Codec):
        return "vlen-utf8"
    if isinstance(codecs[0], BytesCodec) and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder):
        return "bytes"
    return None


def _chunk_file(arr, chunk: int) -> Path:
    key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
    return Path(arr.store_path.store.root) / arr.path / key


def _read_rows(arr, start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) of one whole row chunk into ``out`` (a C-contiguous view)."""
    rows = arr.chunks[0]
    path = raw_chunk_file(arr, start // rows) if start % rows == 0 else None
    if path is None:
        out[...] = arr[start:stop]
        return
    try:
        with open(path, "rb", buffering=0) as fh:
            got = fh.readinto(memoryview(out).cast("B"))
    except FileNotFoundError:  # zarr leaves chunks equal to the fill value unwritten
        out[...] = arr.metadata.fill_value
        return
    if got != out.nbytes:
        out[...] = arr[start:stop]  # a short file: let zarr decide (it raises on corruption)


def _write_rows(arr, start: int, values: np.ndarray) -> None:
    """Write one whole row chunk starting at ``start``, atomically (tmp file + rename).

    Raw chunks are written as their bytes; uncompressed string chunks through numcodecs'
    VLenUTF8 (the codec zarr itself runs), skipping zarr's per-chunk machinery.
    """
    rows = arr.chunks[0]
    layout = _raw_layout(arr) if start % rows == 0 else None
    if layout is None:
        arr[start : start + len(values)] = values
        return
    if layout == "vlen-utf8":
        from numcodecs import VLenUTF8

        full = np.full(rows, arr.metadata.fill_value, dtype=object)  # edge chunks are stored full-size
        full[: len(values)] = values
        data = memoryview(VLenUTF8().encode(full))
    else:
        full = values
        if len(values) != rows or not values.flags.c_contiguous or values.dtype != arr.dtype:
            full = np.zeros((rows,) + arr.shape[1:], dtype=arr.dtype)
            full[: len(values)] = values
        data = memoryview(full).cast("B")
    path = _chunk_file(arr, start // rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class FeatureGroup:
    """Typed access to one group. Reading refuses incomplete groups unless asked."""

    def __init__(self, node) -> None:
        self.node = node
        self._arrays: dict[str, Any] = {}

    def array(self, name: str):
        """An array of the group, opened once (each open reads its metadata)."""
        if name not in self._arrays:
            self._arrays[name] = self.node[name]
        return self._arrays[name]

    # ------------------------------------------------------------------ create
    @classmethod
    def create(
        cls,
        root,
        path: str,
        *,
        n: int,
        dim: int,
        num_classes: int = 0,
        dtype: str = "float16",
        chunk_rows: int | None = None,
        attrs: dict[str, Any],
    ) -> FeatureGroup:
        np_dtype = np.dtype(dtype)
        rows = int(chunk_rows or chunk_rows_for(dim, np_dtype.itemsize, n))
        n_chunks = -(-n // rows) if n else 0
        meta = {**attrs, "n": n, "dim": dim, "dtype": np_dtype.name, "chunk_rows": rows, "checksum": CHECKSUM,
                "n_chunks": n_chunks, "complete": n == 0, "chunks_complete": []}
        meta["cache_key"] = cache_key(meta)
        common = {"chunks": (rows,), "dimension_names": ["sample"]}
        arrays = {
            "features": dict(shape=(n, dim), dtype=np_dtype, chunks=(rows, dim), compressors=None, fill_value=0,
                             dimension_names=["sample", "feature"]),
            "labels": dict(shape=(n,), dtype="int64", fill_value=-1, compressors=None, **common),
            "ids": dict(shape=(n,), dtype=str, fill_value="", compressors=None, **common),
            "chunk_checksum": dict(shape=(n_chunks,), dtype="int64", chunks=(1,), fill_value=-1, compressors=None,
                                   dimension_names=["chunk"]),
        }
        if num_classes:
            arrays["logits"] = dict(shape=(n, num_classes), dtype=np_dtype, chunks=(rows, num_classes), fill_value=0,
                                    dimension_names=["sample", "class"])
        node = root.create_group(path, overwrite=True, attributes=meta)
        _create_arrays(node, arrays)
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
            return self.node.attrs[key]
        raise AttributeError(key)

    @property
    def checksum(self) -> str:
        """The group's chunk checksum algorithm (schema-1 groups: crc32)."""
        return self.node.attrs.get("checksum", "crc32")

    @property
    def has_logits(self) -> bool:
        return "logits" in self.node

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(self.n, start + self.chunk_rows)

    def stored_checksums(self) -> np.ndarray:
        """Each row chunk's CRC-32 as written, -1 where the chunk is not done yet.

        (Caches of schema 1 stored them as hex strings, "" for not done; read the same way.)
        """
        if not self.n_chunks:
            return np.zeros(0, dtype=np.int64)
        arr = self.array("chunk_checksum")
        try:
            if arr.dtype.kind in "iu" and _is_local(arr):
                out = np.empty(self.n_chunks, dtype=np.int64)
                for i in range(self.n_chunks):
                    _read_rows(arr, i, i + 1, out[i : i + 1])
                return out
            values = arr[:]
        except Exception:  # a marker torn by a crash: that chunk is not done
            values = np.empty(self.n_chunks, dtype=object)
            for i in range(self.n_chunks):
                try:
                    values[i] = arr[i]
                except Exception:
                    values[i] = -1
        return np.array([_as_crc(v) for v in values], dtype=np.int64)

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
                    logits: np.ndarray | None = None) -> str:
        """Write one whole row chunk, then its checksum (the 'done' marker) last."""
        start, stop = self.chunk_bounds(chunk)
        feats = np.asarray(features, dtype=self.node["features"].dtype)
        if feats.shape != (stop - start, self.dim):
            raise CacheError(f"chunk {chunk} wants {(stop - start, self.dim)} rows, got {feats.shape}")
        _write_rows(self.array("features"), start, feats)
        labels = np.asarray(labels, dtype=np.int64)
        _write_rows(self.array("labels"), start, labels)
        _write_rows(self.array("ids"), start, np.asarray(ids, dtype=object).astype(str))
        if logits is not None and self.has_logits:
            self.array("logits")[start:stop] = np.asarray(logits, dtype=feats.dtype)
        digest = chunk_checksum(feats, labels, self.checksum)
        _write_rows(self.array("chunk_checksum"), chunk, np.array([digest], dtype=np.int64))
        return digest

    def write_rows(self, start_chunk: int, features: np.ndarray, labels: np.ndarray, ids: list[str],
                   logits: np.ndarray | None = None) -> None:
        """Write a run of whole chunks from ``start_chunk`` at once (bulk imports and copies).

        Feature and label chunks go to disk on a few threads (file writes and CRC-32 release
        the GIL) while zarr encodes the ids and logits; the checksums (the 'done' markers) last.
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
            _write_rows(farr, start + a, feats[a:b])
            _write_rows(larr, start + a, labels[a:b])
            _write_rows(iarr, start + a, names[a:b])
            return chunk_checksum(feats[a:b], labels[a:b], algorithm)

        with ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="backbench-write") as pool:
            futures = [pool.submit(one, a, b) for a, b in bounds]
            if logits is not None and self.has_logits:
                self.array("logits")[start:stop] = np.asarray(logits, dtype=feats.dtype)
            digests = [f.result() for f in futures]
            marks = self.array("chunk_checksum")
            list(pool.map(lambda c: _write_rows(marks, c, np.array([digests[c - chunks.start]], dtype=np.int64)),
                          chunks))

    def finalize(self, extra: dict[str, Any] | None = None) -> None:
        done = self.done_chunks()
        self.node.attrs.update({**(extra or {}), "complete": bool(done.all()),
                                "chunks_complete": _ranges(np.flatnonzero(done))})

    # -------------------------------------------------------------------- read
    def _rows(self, complete_only: bool) -> slice | np.ndarray:
        if self.node.attrs.get("complete"):  # set once every chunk is written; never unset
            return slice(None)
        done = self.done_chunks()
        if done.all():
            return slice(None)
        if not complete_only:
            raise IncompleteGroup(
                f"incomplete: {self.rows_done()} of {self.n} rows in {self.path}; finish it with "
                f"`backbench extract` (or ask for the complete rows only)"
            )
        return np.concatenate([np.arange(*self.chunk_bounds(i)) for i in np.flatnonzero(done)] or
                              [np.zeros(0, dtype=np.int64)])

    def read(self, name: str = "features", *, complete_only: bool = False, dtype: Any = None) -> np.ndarray:
        """An array of the group; ``complete_only`` keeps just the finished chunks' rows."""
        rows = self._rows(complete_only)
        arr = self.array(name)
        if arr.dtype.kind in "fiu" and isinstance(rows, slice) and _is_local(arr):
            out = np.empty(arr.shape, dtype=arr.dtype)
            for c in range(self.n_chunks):
                a, b = self.chunk_bounds(c)
                _read_rows(arr, a, b, out[a:b])
        else:
            out = arr[rows] if isinstance(rows, slice) else arr.get_orthogonal_selection((rows,))
        return out.astype(dtype, copy=False) if dtype is not None else out

    def features(self, **kw: Any) -> np.ndarray:
        return self.read("features", **kw)

    def labels(self, **kw: Any) -> np.ndarray:
        return self.read("labels", **kw)

    def ids(self, **kw: Any) -> np.ndarray:
        return self.read("ids", **kw)

    def logits(self, **kw: Any) -> np.ndarray | None:
        return self.read("logits", **kw) if self.has_logits else None

    def summary(self) -> dict[str, Any]:
        a = self.attrs
        return {"backbone": a["backbone"], "dataset": a["dataset"], "split": a["split"],
                "features": a.get("feature_kind", "pooled"), "n": a["n"], "dim": a["dim"], "dtype": a["dtype"], "rows_done": self.rows_done(),
                "complete": self.is_complete, "logits": self.has_logits, "path": self.path}


def _create_arrays(node, arrays: dict[str, dict[str, Any]]) -> None:
    """Create the group's arrays side by side (each writes its own metadata document)."""
    import asyncio

    from zarr.core.sync import sync

    async def create_all() -> None:
        await asyncio.gather(*(node._async_group.create_array(name, **spec) for name, spec in arrays.items()))

    sync(create_all())


def group_key(attrs: dict[str, Any]) -> tuple[str, str, str, str]:
    """``(backbone, dataset, split, kind)`` of a group's attributes: where it lives in a cache."""
    kind = str(attrs.get("feature_kind") or "pooled")
    return attrs["backbone"], attrs["dataset"], attrs["split"], kind


def cache_key(attrs: dict[str, Any]) -> str:
    """Hash of everything that changes the features (see :data:`PROVENANCE_KEYS`)."""
    payload = json.dumps({k: attrs.get(k) for k in PROVENANCE_KEYS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _as_crc(value: Any) -> int:
    """A stored checksum (int, or schema-1 hex string) as an int; -1 for not done."""
    if isinstance(value, str):
        return int(value, 16) if value else -1
    return int(value)


def _ranges(idx: np.ndarray) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]]: half-open runs, compact in JSON attributes."""
    out: list[list[int]] = []
    for i in idx.tolist():
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
