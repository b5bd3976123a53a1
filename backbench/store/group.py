"""One (backbone, dataset, split) group of the cache: its arrays and its provenance."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import zlib
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


CHECKSUM = "crc32"  # integrity, not security: several GB/s, so writes keep near .npy speed


def chunk_checksum(features: np.ndarray, labels: np.ndarray) -> str:
    """CRC-32 (zlib) of the chunk's feature bytes, then its label bytes, as 8 hex digits."""
    crc = zlib.crc32(memoryview(np.ascontiguousarray(features)).cast("B"))
    crc = zlib.crc32(memoryview(np.ascontiguousarray(labels)).cast("B"), crc)
    return f"{crc:08x}"


def raw_chunk_file(arr, chunk: int) -> Path | None:
    """The file of row chunk ``chunk`` when it is stored raw on a local disk, else None.

    Uncompressed little-endian chunks hold exactly the C-order bytes of the (full-size)
    chunk, so they can be read into, or written from, a numpy buffer with no zarr codec
    pipeline in between: the same bytes zarr reads and writes, at ``.npy`` speed.
    """
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    store = arr.store_path.store
    codecs = arr.metadata.codecs
    if not isinstance(store, LocalStore) or len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder:
        return None
    key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
    return Path(store.root) / arr.path / key


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
    """Write one whole row chunk starting at ``start``, atomically (tmp file + rename)."""
    rows = arr.chunks[0]
    path = raw_chunk_file(arr, start // rows)
    if path is None or start % rows:
        arr[start : start + len(values)] = values
        return
    full = values
    if len(values) != rows or not values.flags.c_contiguous or values.dtype != arr.dtype:
        full = np.zeros((rows,) + arr.shape[1:], dtype=arr.dtype)  # edge chunks are stored full-size
        full[: len(values)] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with open(tmp, "wb") as fh:
        fh.write(memoryview(full).cast("B"))
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
        node = root.create_group(path, overwrite=True)
        common = {"chunks": (rows,), "dimension_names": ["sample"]}
        node.create_array("features", shape=(n, dim), dtype=np_dtype, chunks=(rows, dim),
                          compressors=None, fill_value=0, dimension_names=["sample", "feature"])
        node.create_array("labels", shape=(n,), dtype="int64", fill_value=-1, **common)
        node.create_array("ids", shape=(n,), dtype=str, fill_value="", **common)
        if num_classes:
            node.create_array("logits", shape=(n, num_classes), dtype=np_dtype, chunks=(rows, num_classes),
                              fill_value=0, dimension_names=["sample", "class"])
        node.create_array("chunk_checksum", shape=(n_chunks,), dtype=str, chunks=(1,), fill_value="",
                          dimension_names=["chunk"])
        meta = {**attrs, "n": n, "dim": dim, "dtype": np_dtype.name, "chunk_rows": rows, "checksum": CHECKSUM,
                "n_chunks": n_chunks, "complete": n == 0, "chunks_complete": []}
        meta["cache_key"] = cache_key(meta)
        node.attrs.update(meta)
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
    def has_logits(self) -> bool:
        return "logits" in self.node

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(self.n, start + self.chunk_rows)

    def done_chunks(self) -> np.ndarray:
        """Boolean mask over row chunks: True where the chunk is written and checksummed."""
        if not self.n_chunks:
            return np.zeros(0, dtype=bool)
        try:
            return np.asarray(self.array("chunk_checksum")[:] != "", dtype=bool)
        except Exception:  # a marker torn by a crash: fall back chunk by chunk
            out = np.zeros(self.n_chunks, dtype=bool)
            for i in range(self.n_chunks):
                try:
                    out[i] = self.node["chunk_checksum"][i] != ""
                except Exception:
                    out[i] = False
            return out

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
        self.array("labels")[start:stop] = labels
        self.array("ids")[start:stop] = np.asarray(ids, dtype=object).astype(str)
        if logits is not None and self.has_logits:
            self.array("logits")[start:stop] = np.asarray(logits, dtype=feats.dtype)
        digest = chunk_checksum(feats, np.asarray(labels, dtype=np.int64))
        self.array("chunk_checksum")[chunk] = digest
        return digest

    def write_rows(self, start_chunk: int, features: np.ndarray, labels: np.ndarray, ids: list[str],
                   logits: np.ndarray | None = None) -> None:
        """Write a run of whole chunks from ``start_chunk`` at once (bulk imports and copies).

        Feature chunks go to disk one after another (parallel writers only contend for the
        page cache); labels, ids and logits in one zarr call each; the checksums (the 'done'
        markers) last.
        """
        start = self.chunk_bounds(start_chunk)[0]
        stop = start + len(features)
        chunks = range(start_chunk, start_chunk + -(-len(features) // self.chunk_rows))
        if stop != self.n and (stop - start) % self.chunk_rows:
            raise CacheError(f"write_rows needs whole chunks of {self.chunk_rows} rows (or the last rows)")
        feats = np.asarray(features, dtype=self.array("features").dtype)
        labels = np.asarray(labels, dtype=np.int64)
        bounds = [(a - start, b - start) for a, b in map(self.chunk_bounds, chunks)]
        digests = []
        for a, b in bounds:
            _write_rows(self.array("features"), start + a, feats[a:b])
            digests.append(chunk_checksum(feats[a:b], labels[a:b]))
        self.array("labels")[start:stop] = labels
        self.array("ids")[start:stop] = np.asarray(ids, dtype=object).astype(str)
        if logits is not None and self.has_logits:
            self.array("logits")[start:stop] = np.asarray(logits, dtype=feats.dtype)
        self.array("chunk_checksum")[chunks.start:chunks.stop] = np.asarray(digests)

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
        if arr.dtype.kind in "fiu" and isinstance(rows, slice):
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
        return {"backbone": a["backbone"], "dataset": a["dataset"], "split": a["split"], "n": a["n"],
                "dim": a["dim"], "dtype": a["dtype"], "rows_done": self.rows_done(),
                "complete": self.is_complete, "logits": self.has_logits, "path": self.path}


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
