"""One (backbone, dataset, split) group of the cache: its arrays and its provenance."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from backbench.errors import CacheError, IncompleteGroup

CHUNK_BYTES = 4 << 20  # ~4 MiB of features per row chunk
PROVENANCE_KEYS = ("backbone", "weights_sha256", "preprocess", "feature_kind", "dataset_fingerprint", "dtype")


def chunk_rows_for(dim: int, itemsize: int, n: int) -> int:
    """Rows per chunk: about :data:`CHUNK_BYTES` of features, a multiple of 64, at most ``n``."""
    rows = max(64, (CHUNK_BYTES // max(1, dim * itemsize)) // 64 * 64)
    return int(max(1, min(rows, n)))


def chunk_checksum(features: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(features).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


class FeatureGroup:
    """Typed access to one group. Reading refuses incomplete groups unless asked."""

    def __init__(self, node) -> None:
        self.node = node

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
        node.create_array("chunk_sha256", shape=(n_chunks,), dtype=str, chunks=(1,), fill_value="",
                          dimension_names=["chunk"])
        meta = {**attrs, "n": n, "dim": dim, "dtype": np_dtype.name, "chunk_rows": rows,
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
            return np.asarray(self.node["chunk_sha256"][:] != "", dtype=bool)
        except Exception:  # a marker torn by a crash: fall back chunk by chunk
            out = np.zeros(self.n_chunks, dtype=bool)
            for i in range(self.n_chunks):
                try:
                    out[i] = self.node["chunk_sha256"][i] != ""
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
        self.node["features"][start:stop] = feats
        self.node["labels"][start:stop] = labels
        self.node["ids"][start:stop] = np.asarray(ids, dtype=object).astype(str)
        if logits is not None and self.has_logits:
            self.node["logits"][start:stop] = np.asarray(logits, dtype=feats.dtype)
        digest = chunk_checksum(feats, np.asarray(labels, dtype=np.int64))
        self.node["chunk_sha256"][chunk] = digest
        return digest

    def finalize(self, extra: dict[str, Any] | None = None) -> None:
        done = self.done_chunks()
        self.node.attrs.update({**(extra or {}), "complete": bool(done.all()),
                                "chunks_complete": _ranges(np.flatnonzero(done))})

    # -------------------------------------------------------------------- read
    def _rows(self, complete_only: bool) -> slice | np.ndarray:
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
        arr = self.node[name]
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
