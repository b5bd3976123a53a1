"""Writing extracted rows: whole row chunks, on a background thread, one writer per group."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from backbench.extract.datasets import ImageSource
from backbench.store.group import FeatureGroup


class ChunkWriter:
    """Collects rows per chunk and writes full chunks on a background thread."""

    def __init__(self, group: FeatureGroup, source: ImageSource) -> None:
        self.group, self.source = group, source
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backbench-writer")
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]] = {}
        self.futures: list[Future] = []

    def add(self, rows: np.ndarray, feats: np.ndarray, labels: np.ndarray, logits: np.ndarray | None) -> None:
        chunk = int(rows[0]) // self.group.chunk_rows
        parts = self.pending.setdefault(chunk, [])
        parts.append((rows, feats, labels, logits))
        start, stop = self.group.chunk_bounds(chunk)
        if sum(len(p[0]) for p in parts) == stop - start:
            del self.pending[chunk]
            self._submit(chunk, parts)

    def _submit(self, chunk: int, parts) -> None:
        rows = np.concatenate([p[0] for p in parts])
        feats = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
        logits = np.concatenate([p[3] for p in parts]) if parts[0][3] is not None else None
        ids = [self.source.ids[i] for i in rows]
        while len([f for f in self.futures if not f.done()]) >= 2:  # back-pressure
            self.futures[0].result()
            self.futures = [f for f in self.futures if not f.done()]
        self.futures.append(self.pool.submit(self.group.write_chunk, chunk, feats, labels, ids, logits))

    def close(self) -> None:
        """Wait for every submitted write (an interrupted run still finishes its chunks)."""
        self.pool.shutdown(wait=True)
        for f in self.futures:
            f.result()


class KindWriters:
    """One :class:`ChunkWriter` per feature kind's group; the pooled kind's group also gets
    the backbone's logits."""

    def __init__(self, groups: dict[str, FeatureGroup], source: ImageSource) -> None:
        self.writers = {kind: ChunkWriter(g, source) for kind, g in groups.items()}

    def add(self, rows: np.ndarray, labels: np.ndarray, feats: dict[str, np.ndarray],
            logits: np.ndarray | None) -> None:
        for kind, writer in self.writers.items():
            writer.add(rows, feats[kind], labels, logits if kind == "pooled" else None)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
