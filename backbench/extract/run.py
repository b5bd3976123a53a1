"""The extraction loop: images -> frozen backbone -> row chunks of the Zarr cache.

Batches never cross a row chunk, so a resumed or sharded run computes exactly the batches
an uninterrupted run would, and writes whole chunks only. Each chunk's checksum is written
after its data: a chunk without one is redone on the next run.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from backbench.errors import CacheMismatch, SampleError
from backbench.extract.backbones import Backbone, load_backbone
from backbench.extract.data import ImageSource, open_source
from backbench.provenance import library_versions
from backbench.store.cache import Cache
from backbench.store.group import PROVENANCE_KEYS, FeatureGroup
from backbench.store.lock import local_file, locked

Progress = Callable[[int, int], None]


@dataclass
class ExtractResult:
    backbone: str
    dataset: str
    split: str
    n: int
    status: str  # "extracted" | "up-to-date" | "partial"
    rows_written: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    skipped: list[dict[str, str]] = field(default_factory=list)
    group: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from backbench.errors import BackbenchError

        raise BackbenchError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return device


def default_batch_size(device: str) -> int:
    """256 images per batch on a GPU (fills an H100 with a ViT-B/16 in bf16), 64 on a CPU."""
    return 256 if device.startswith("cuda") else 64


def limit_source(source: ImageSource, limit: int | None) -> ImageSource:
    """The first ``limit`` samples of ``source`` (its fingerprint covers just those)."""
    if limit is None or limit >= len(source):
        return source
    sub = copy.copy(source)
    sub.ids, sub.labels = source.ids[:limit], source.labels[:limit]
    return sub


def group_attrs(backbone: Backbone, source: ImageSource, dataset: str, split: str, dtype: str) -> dict[str, Any]:
    return {
        "backbench_kind": "features",
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "backbone_info": backbone.describe(),
        "preprocess": backbone.preprocess.to_dict(),
        "feature_kind": "pooled",
        "dataset": dataset,
        "split": split,
        "source": source.spec,
        "dataset_fingerprint": source.fingerprint(),
        "classes": list(source.classes),
        "dtype": np.dtype(dtype).name,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in PROVENANCE_KEYS if old.get(k) != new.get(k)]


def open_or_create(cache: Cache, attrs: dict[str, Any], n: int, dim: int, num_classes: int,
                   *, overwrite: bool, chunk_rows: int | None) -> FeatureGroup:
    """The group for ``attrs``, created if absent; one made differently is refused."""
    key = (attrs["backbone"], attrs["dataset"], attrs["split"])
    if key in cache:
        group = cache.group(*key)
        diff = _mismatch(group.attrs, attrs)
        if not diff and group.n == n:
            return group
        if not overwrite:
            what = ", ".join(diff) or "number of samples"
            raise CacheMismatch(
                f"{group.path} exists with a different {what}; pass --overwrite to replace it "
                f"or extract under another --dataset/--split name"
            )
    return cache.create_group(*key, n=n, dim=dim, num_classes=num_classes, dtype=attrs["dtype"],
                              chunk_rows=chunk_rows, attrs=attrs)


class _Images:
    """torch Dataset: index -> (index, uint8 CHW tensor, error text or "")."""

    def __init__(self, source: ImageSource, transform, shape: tuple[int, int, int]) -> None:
        self.source, self.transform, self.shape = source, transform, shape

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        import torch

        try:
            return index, self.transform(self.source.load(index)), ""
        except Exception as exc:  # reported per sample by the main process
            return index, torch.zeros(self.shape, dtype=torch.uint8), str(exc) or type(exc).__name__


def plan_batches(group: FeatureGroup, batch_size: int, shard: tuple[int, int]) -> list[list[int]]:
    """Batches of row indices over this shard's unfinished chunks, never crossing a chunk."""
    index, count = shard
    done = group.done_chunks()
    batches = []
    for chunk in range(group.n_chunks):
        if done[chunk] or chunk % count != index:
            continue
        start, stop = group.chunk_bounds(chunk)
        batches += [list(range(s, min(stop, s + batch_size))) for s in range(start, stop, batch_size)]
    return batches


class _ChunkWriter:
    """Collects rows per chunk and writes full chunks on a background thread."""

    def __init__(self, group: FeatureGroup, source: ImageSource) -> None:
        self.group, self.source = group, source
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backbench-writer")
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}
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


def _loader(source: ImageSource, backbone: Backbone, batches: list[list[int]], workers: int, pin: bool):
    from torch.utils.data import DataLoader

    ds = _Images(source, backbone.preprocess.to_uint8(), backbone.preprocess.input_size)
    kw: dict[str, Any] = {"prefetch_factor": 4, "persistent_workers": False} if workers else {}
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, pin_memory=pin, **kw)


def run_batches(backbone: Backbone, group: FeatureGroup, source: ImageSource, batches: list[list[int]], *,
                device: str, workers: int, on_error: str, progress: Progress | None) -> list[dict[str, str]]:
    """Forward every batch and hand its rows to the chunk writer; returns skipped samples."""
    import torch

    cuda = device.startswith("cuda")
    model = backbone.model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    total, done, skipped = sum(map(len, batches)), 0, []
    writer = _ChunkWriter(group, source)
    try:
        for index, x, errors in _loader(source, backbone, batches, workers, pin=cuda):
            bad = [(int(i), e) for i, e in zip(index, errors) if e]
            if bad and on_error == "fail":
                raise SampleError(f"{bad[0][1]} (sample {source.ids[bad[0][0]]!r}); "
                                  f"fix or remove it, or pass --on-error skip")
            x = x.to(device, non_blocking=True)
            x = backbone.preprocess.normalize(x)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                feats, logits = backbone.forward(x)
            rows = index.numpy()
            labels = source.labels[rows].copy()
            for i, err in bad:
                labels[rows == i] = -1
                skipped.append({"id": source.ids[i], "error": err})
            writer.add(rows, feats.float().cpu().numpy(), labels,
                       logits.float().cpu().numpy() if logits is not None else None)
            done += len(rows)
            if progress:
                progress(done, total)
    finally:
        writer.close()
        model.to("cpu")
    return skipped


def extract(
    backbone: Backbone | str,
    source: ImageSource | str,
    *,
    cache: Cache | str | None = None,
    dataset: str,
    split: str,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
    workers: int | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    shard: tuple[int, int] = (0, 1),
    on_error: str = "fail",
    progress: Progress | None = None,
    on_wait: Callable[[], None] | None = None,
) -> ExtractResult:
    """Extract one (backbone, dataset, split) into the cache; resumes and skips finished chunks.

    Another process extracting the same group holds its lock: this one waits (``on_wait`` is
    told), then does only what is left.
    """
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    batch_size = batch_size or default_batch_size(resolve_device(device))
    model = backbone if isinstance(backbone, Backbone) else load_backbone(backbone)
    src = limit_source(source if isinstance(source, ImageSource) else open_source(source, split), limit)
    attrs = group_attrs(model, src, dataset, split, dtype)
    with locked(local_file(cache.path)):
        group = open_or_create(cache, attrs, len(src), model.feature_dim, model.num_classes,
                               overwrite=overwrite, chunk_rows=chunk_rows)
    # Shards own disjoint chunks and run side by side; a whole-group run takes the group's lock
    # so a second one waits instead of redoing the same chunks (identical bytes either way:
    # every chunk write is an atomic rename of deterministic content).
    lock = local_file(cache.path, group.path, "features") if shard[1] == 1 else None
    with locked(lock, on_wait):
        return _extract_pending(model, group, src, batch_size=batch_size, device=device, workers=workers,
                                shard=shard, on_error=on_error, progress=progress)


def _extract_pending(model: Backbone, group: FeatureGroup, src: ImageSource, *, batch_size: int, device: str,
                     workers: int | None, shard: tuple[int, int], on_error: str,
                     progress: Progress | None) -> ExtractResult:
    batches = plan_batches(group, batch_size, shard)
    dataset, split = group.attrs["dataset"], group.attrs["split"]
    result = ExtractResult(model.name, dataset, split, len(src), "up-to-date", group=group.path)
    if not batches:
        if not group.attrs.get("complete") and group.is_complete:
            group.finalize()
        return result
    device = resolve_device(device)
    started = time.perf_counter()
    skipped = run_batches(model, group, src, batches, device=device,
                          workers=os.cpu_count() or 1 if workers is None else workers,
                          on_error=on_error, progress=progress)
    seconds = time.perf_counter() - started
    result.rows_written = sum(map(len, batches))
    result.seconds, result.images_per_s = seconds, result.rows_written / max(seconds, 1e-9)
    result.skipped = skipped
    fresh = {s["id"] for s in skipped}
    previous = [s for s in group.attrs.get("skipped", []) if s["id"] not in fresh]
    group.finalize({"skipped": previous + skipped,
                    "extraction": {"device": device, "batch_size": batch_size,
                                   "images_per_s": round(result.images_per_s, 2)}})
    result.status = "extracted" if group.is_complete else "partial"
    return result
