"""The extraction loop: images -> frozen backbone -> row chunks of the Zarr cache.

Batches never cross a row chunk, so a resumed or sharded run computes exactly the batches
an uninterrupted run would, and writes whole chunks only. Each chunk's checksum is written
after its data: a chunk without one is redone on the next run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from backbench.errors import CacheError, CacheMismatch, DamagedGroup, SampleError
from backbench.extract.backbones import Backbone, load_backbone
from backbench.extract.datasets import ImageSource, limit_source, open_source
from backbench.extract.decode import (ON_DEVICE, DeviceDecoder, LoaderPace, jpeg_payload, provenance, resolve_decode,
                                     started_decode)
from backbench.kinds import check_view, expand, stored_kind
from backbench.device import default_batch_size, resolve_device
from backbench.provenance import library_versions
from backbench.store.cache import Cache, default_cache_path
from backbench.store.location import Location
from backbench.store.group import PROVENANCE_KEYS, FeatureGroup, chunk_rows_for, group_key
from backbench.store.cleanup import clean_partials
from backbench.store.lock import group_locked, local_folder, locked

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
    decoded_on_device: int | None = None  # images the device decoded (device and mixed decoding)
    first_batch_s: float = 0.0  # seconds from starting the workers until the loop took their first batch
    waited_s: float = 0.0  # seconds the loop then waited for the workers' batches (the device idle)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_workers(decode: str) -> int:
    """All cores; with ``decode="mixed"`` two fewer, which the main process's threads (forward,
    device decoding, writing) keep while the workers decode."""
    cores = os.cpu_count() or 1
    return max(1, cores - 2) if decode == "mixed" else cores


def group_attrs(backbone: Backbone, source: ImageSource, dataset: str, split: str, dtype: str,
                decoding: dict[str, str] | None = None, kind: str = "pooled", view: str = "center") -> dict[str, Any]:
    return {
        "backbench_kind": "features",
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "backbone_info": backbone.describe(),
        "preprocess": {**backbone.preprocess.to_dict(), **(decoding or {})},
        "feature_kind": stored_kind(kind, view),
        "dataset": dataset,
        "split": split,
        "source": source.spec,
        "dataset_fingerprint": source.fingerprint(),
        "classes": list(source.classes),
        "multilabel": bool(source.multilabel),
        "dtype": np.dtype(dtype).name,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _shown(record: dict[str, Any], field: str) -> str:
    return repr(record[field]) if field in record else "none"


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The provenance keys that differ; for a record (the preprocessing), which of its fields
    differ and how: ``preprocess (decode: stored 'torchvision-cuda', asked for none)``."""
    out = []
    for k in PROVENANCE_KEYS:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = [f"{f}: stored {_shown(a, f)}, asked for {_shown(b, f)}"
                      for f in sorted({*a, *b}) if a.get(f) != b.get(f)]
            k = f"{k} ({'; '.join(fields)})"
        out.append(k)
    return out


def open_or_create(cache: Cache, attrs: dict[str, Any], n: int, dim: int, num_classes: int,
                   *, overwrite: bool, chunk_rows: int | None, batch_size: int = 1,
                   kind: str = "pooled") -> FeatureGroup:
    """The group for ``attrs``, created if absent; one made differently is refused.

    New groups get row chunks of about 4 MiB rounded to whole batches, so no batch is cut
    short at a chunk boundary (batches never cross chunks).
    """
    key = (attrs["backbone"], attrs["dataset"], attrs["split"], kind)
    if key in cache:
        try:
            group = cache.group(*key)
        except DamagedGroup:
            if not overwrite:
                raise
        else:
            return _reuse(group, attrs, n, overwrite) or _create(cache, key, attrs, n, dim, num_classes,
                                                                 chunk_rows, batch_size)
    return _create(cache, key, attrs, n, dim, num_classes, chunk_rows, batch_size)


def _reuse(group: FeatureGroup, attrs: dict[str, Any], n: int, overwrite: bool) -> FeatureGroup | None:
    """``group`` when it was made as ``attrs`` asks; None to replace it (``overwrite``); else refused."""
    diff = _mismatch(group.attrs, attrs)
    if not diff and group.n == n:
        return group
    if not overwrite:
        raise CacheMismatch(
            f"{group.path} exists with a different {', '.join(diff) or 'number of samples'}; pass --overwrite "
            f"to replace it or extract under another --dataset/--split name"
            + (f" (it holds {group.n} samples, this run asks for {n}: a different --limit? rerun with "
               f"--limit {group.n} to use it, or --overwrite to extract all {n})" if group.n != n else "")
        )
    return None


def _create(cache: Cache, key: tuple[str, str, str, str], attrs: dict[str, Any], n: int, dim: int,
            num_classes: int, chunk_rows: int | None, batch_size: int) -> FeatureGroup:
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(dim, np.dtype(attrs["dtype"]).itemsize, n)
        if chunk_rows >= batch_size:
            chunk_rows = chunk_rows // batch_size * batch_size
    return cache.create_group(*key, n=n, dim=dim, num_classes=num_classes, dtype=attrs["dtype"],
                              chunk_rows=chunk_rows, attrs=attrs)


class _Images:
    """torch Dataset: index -> (index, uint8 CHW tensor, error text or "").

    With ``decode="device"`` a device-decodable JPEG comes back as its bytes (a 1-D uint8
    tensor) for :class:`~backbench.extract.decode.DeviceDecoder`; everything else is decoded here.
    With ``decode="mixed"`` a worker also decodes here as many of its batch's JPEGs as it can
    before the main process needs the batch (:class:`~backbench.extract.decode.LoaderPace`);
    ``positions`` maps each batch's first index to its place in the loader's order.
    """

    def __init__(self, source: ImageSource, transform, shape: tuple[int, int, int], decode: str = "workers",
                 positions: dict[int, int] | None = None) -> None:
        self.source, self.transform, self.shape, self.decode = source, transform, shape, decode
        self.pace = LoaderPace() if decode == "mixed" else None
        self.positions = positions or {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int, cpu: bool = False):
        import torch

        try:
            if self.decode in ON_DEVICE and not cpu:
                payload = jpeg_payload(self.source.read_bytes(index))
                if payload is not None:
                    return index, payload, ""
            return index, self.transform(self.source.load(index)), ""
        except Exception as exc:  # reported per sample by the main process
            return index, torch.zeros(self.shape, dtype=torch.uint8), str(exc) or type(exc).__name__

    def __getitems__(self, indices: list[int]) -> list:
        """One batch (the DataLoader's batched fetch); in a ``mixed`` worker, JPEGs are decoded
        here while the batch can still be ready a batch ahead of when it is taken."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if self.pace is None or info is None:  # the main process never decodes ahead
            return [self[i] for i in indices]
        position, items, used, cpu = self.positions.get(indices[0], 0), [], 0.0, 0
        for i in indices:
            if self.pace.allows(position, info.num_workers, used / cpu if cpu else 0.0):
                start = time.perf_counter()
                items.append(self.__getitem__(i, cpu=True))
                used, cpu = used + time.perf_counter() - start, cpu + 1
            else:
                items.append(self[i])
        return items


def _collate_packed(batch):
    """Device decoding: a batch's JPEG bytes packed into one tensor (one shared-memory
    transfer per batch, not one per image), the worker-decoded images stacked into another.
    In a worker both are built in shared memory, as ``default_collate`` does, so sending them
    copies nothing."""
    import torch
    from torch.utils.data import get_worker_info

    info = get_worker_info()

    def join(parts, how, shape):
        if not parts:
            return torch.zeros(0, dtype=torch.uint8)
        out = None
        if info is not None:  # straight into shared memory, as default_collate does
            storage = parts[0]._typed_storage()._new_shared(int(np.prod(shape)), device=parts[0].device)
            out = parts[0].new(storage).resize_(*shape)
        return how(parts, out=out)

    index, payloads, errors = zip(*batch)
    jpeg = [p.ndim == 1 for p in payloads]
    raw = [p for p, j in zip(payloads, jpeg) if j]
    data = join(raw, torch.cat, (sum(len(p) for p in raw),))
    lengths = torch.as_tensor([len(p) for p in raw], dtype=torch.int64)
    decoded = [p for p, j in zip(payloads, jpeg) if not j]
    images = join(decoded, torch.stack, (len(decoded), *decoded[0].shape) if decoded else (0,))
    return torch.as_tensor(index), (torch.as_tensor(jpeg), data, lengths, images), list(errors)


def _unpack(packed) -> list:
    """The per-sample payloads of :func:`_collate_packed`: byte views and decoded images."""
    jpeg, data, lengths, images = packed
    chunks, decoded = iter(data.split(lengths.tolist())), iter(images)
    return [next(chunks) if j else next(decoded) for j in jpeg.tolist()]


def plan_batches(group: FeatureGroup | list[FeatureGroup], batch_size: int,
                 shard: tuple[int, int]) -> list[list[int]]:
    """Batches of row indices over this shard's unfinished chunks, never crossing a chunk.

    With several groups (feature kinds, sharing one chunking) a chunk is done when done in all.
    """
    groups = group if isinstance(group, list) else [group]
    group = groups[0]
    index, count = shard
    done = np.logical_and.reduce([g.done_chunks() for g in groups])
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


def _loader(source: ImageSource, backbone: Backbone, batches: list[list[int]], workers: int, pin: bool,
            decode: str = "workers"):
    from torch.utils.data import DataLoader

    ds = _Images(source, backbone.preprocess.to_uint8(), backbone.preprocess.input_size, decode,
                 positions={b[0]: p for p, b in enumerate(batches)} if decode == "mixed" else None)
    kw: dict[str, Any] = {"prefetch_factor": 4, "persistent_workers": False} if workers else {}
    if decode in ON_DEVICE:
        kw["collate_fn"] = _collate_packed
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, pin_memory=pin, **kw)


class _Waits:
    """Iterates a loader, timing how long each batch kept the main process waiting (the
    device idle for want of images) and telling each take to the workers' pace (``mixed``)."""

    def __init__(self, loader, pace: LoaderPace | None = None) -> None:
        self.pace = pace
        self.first = 0.0  # from starting the workers to the first batch
        self.after = 0.0  # every later batch
        self.started = time.monotonic()
        self.batches = iter(loader)  # starts the workers

    def __iter__(self):
        for taken in itertools.count():
            asked = time.monotonic() if taken else self.started
            try:
                batch = next(self.batches)
            except StopIteration:
                return
            waited = time.monotonic() - asked
            if taken:
                self.after += waited
            else:
                self.first = waited
            if self.pace is not None:
                self.pace.took(waited)
            yield batch

    def close(self) -> None:
        """Stop the workers now (after an error too), not whenever the iterator is collected."""
        self.batches = iter(())


def forward_step(backbone: Backbone, device: str, compile: bool | str = False, kinds: list[str] | None = None,
                 view: str = "center"):
    """uint8 NCHW on the device -> ({kind: features}, logits): normalize, channels-last and
    bf16 on CUDA, the forward pass (the mirrored image too for the ``flip`` views); compiled
    with ``torch.compile`` when asked (``True`` or a backend). Without ``kinds``: the pooled
    ``(features, logits)`` pair."""
    import torch

    from backbench.extract.kinds import kinds_forward

    cuda = device.startswith("cuda")

    def one(x):
        x = backbone.preprocess.normalize(x)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if kinds is None:
                return backbone.forward(x)
            return kinds_forward(backbone, x, kinds)

    def step(x):
        if view == "center" or kinds is None:
            return one(x)
        flipped = one(x.flip(-1))
        if view == "flip":
            return flipped
        feats, logits = one(x)  # center+flip: the two views' features (and logits) averaged
        avg = {k: (v.float() + flipped[0][k].float()) / 2 for k, v in feats.items()}
        return avg, (None if logits is None else (logits.float() + flipped[1].float()) / 2)

    if compile:
        return torch.compile(step, dynamic=False, **({} if compile is True else {"backend": compile}))
    return step


def run_batches(backbone: Backbone, group: FeatureGroup | dict[str, FeatureGroup], source: ImageSource,
                batches: list[list[int]], *, device: str, workers: int, on_error: str, progress: Progress | None,
                decode: str = "workers", compile: bool | str = False,
                view: str = "center") -> tuple[list[dict[str, str]], int | None, tuple[float, float]]:
    """Forward every batch and hand its rows to the chunk writers (one group per feature kind,
    the backbone's logits with the pooled one); returns the skipped samples, how many
    images the device decoded (None with worker decoding), and the seconds the loop waited
    for its first batch and for all later ones."""
    import torch

    # Streams, events and copies go to the current device: make it this one (--device cuda:1).
    with torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext():
        return _run_batches(backbone, group, source, batches, device=device, workers=workers, on_error=on_error,
                            progress=progress, decode=decode, compile=compile, view=view)


def _run_batches(backbone: Backbone, group: FeatureGroup | dict[str, FeatureGroup], source: ImageSource,
                 batches: list[list[int]], *, device: str, workers: int, on_error: str, progress: Progress | None,
                 decode: str = "workers", compile: bool | str = False,
                 view: str = "center") -> tuple[list[dict[str, str]], int | None, tuple[float, float]]:
    """:func:`run_batches` on its device."""
    import torch

    groups = group if isinstance(group, dict) else {"pooled": group}
    group = next(iter(groups.values()))

    cuda = device.startswith("cuda")
    writers = {kind: _ChunkWriter(g, source) for kind, g in groups.items()}
    # The workers start first (pinned batches, on the loader's pinning thread, unless all of it
    # is bytes for the device): they fill the pipeline while the model moves to the device,
    # and are forked before the CUDA context exists where it does not yet.
    loader = _loader(source, backbone, batches, workers, pin=cuda and decode != "device", decode=decode)
    waits = _Waits(loader, loader.dataset.pace if workers else None)
    # Device decoding runs a batch ahead on its own thread, which first warms the decoder up
    # (nvJPEG's first call) while the workers start and the model moves to the device.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backbench-decode") if decode in ON_DEVICE else None
    try:
        decoder = side = compute = None
        if pool is not None:
            decoder = DeviceDecoder(backbone.preprocess, device, _cpu_fallback(source, backbone))
            # Decoding gets a high-priority stream: its few short kernels are what the next
            # forward pass waits for, so they go first rather than queue behind the current
            # forward pass's blocks. The forward pass runs on its own (non-blocking) stream, so
            # work that a library queues on the legacy default stream cannot serialize with it.
            side = torch.cuda.Stream(priority=-1) if cuda else None
            pool.submit(_on_stream, side, decoder.warm_up)
        backbone.model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
        step = forward_step(backbone, device, compile, list(groups), view)
        if side is not None:
            compute = torch.cuda.Stream()
            compute.wait_stream(torch.cuda.current_stream())
        total, done, skipped = sum(map(len, batches)), 0, []
        out_dtype = getattr(torch, np.dtype(group.dtype).name)
        in_flight: list[tuple[np.ndarray, np.ndarray, Any, Any, Any]] = []

        def finish(rows, labels, feats, logits, event) -> None:
            if event is not None:
                event.synchronize()
            for kind, writer in writers.items():
                out = logits if kind == "pooled" and logits is not None else None
                writer.add(rows, feats[kind].numpy(), labels, out.numpy() if out is not None else None)

        batches_in = iter(waits)
        if decoder is not None:
            batches_in = _decode_ahead(pool, batches_in, decoder, side, compute)
        for index, x, errors in batches_in:
            if decoder is None:
                x = x.to(device, non_blocking=True)
            bad = [(int(i), e) for i, e in zip(index, errors) if e]
            if bad and on_error == "fail":
                raise SampleError(f"{bad[0][1]} (sample {source.ids[bad[0][0]]!r}); "
                                  f"fix or remove it, or pass --on-error skip")
            with torch.inference_mode(), torch.cuda.stream(compute) if compute is not None else contextlib.nullcontext():
                feats, logits = step(x)
                # Results come back asynchronously: the device runs this batch while the host
                # decodes and queues the next one; a batch is written once its copy has landed.
                feats = {k: _to_host(v, out_dtype) for k, v in feats.items()}
                logits, event = _to_host(logits, out_dtype), None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
            rows = index.numpy()
            labels = source.labels[rows].copy()
            for i, err in bad:
                labels[rows == i] = -1
                skipped.append({"id": source.ids[i], "error": err})
            in_flight.append((rows, labels, feats, logits, event))
            if len(in_flight) > 1:
                finish(*in_flight.pop(0))
            done += len(rows)
            if progress:
                progress(done, total)
        while in_flight:
            finish(*in_flight.pop(0))
    finally:
        waits.close()
        if pool is not None:
            pool.shutdown(wait=True)
        for writer in writers.values():
            writer.close()
        backbone.model.to("cpu")
    return skipped, (decoder.decoded if decoder is not None else None), (waits.first, waits.after)


def _on_stream(stream, fn, *args):
    """``fn(*args)`` with ``stream`` (None: no change) current on this thread."""
    import torch

    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return fn(*args)


def _decode_ahead(pool, loader, decoder, side, compute=None):
    """Device decoding one batch ahead, on ``pool``'s one thread and (on CUDA) a side stream:
    the host waits on batch i+1's decode while the device still runs batch i's forward pass."""

    def work(index, packed, errors):
        x, late = decoder(index.tolist(), _unpack(packed), stacked=packed[3])
        ready = side.record_event() if side is not None else None
        return index, x, [late.get(i, e) for i, e in enumerate(errors)], ready

    pending = None
    for batch in loader:
        future = pool.submit(_on_stream, side, work, *batch)
        if pending is not None:
            yield _ready(*pending.result(), compute)
        pending = future
    if pending is not None:
        yield _ready(*pending.result(), compute)


def _ready(index, x, errors, event, compute=None):
    """Make the compute stream wait for a batch decoded on the side stream."""
    if event is not None:
        import torch

        stream = compute or torch.cuda.current_stream()
        stream.wait_event(event)
        x.record_stream(stream)
    return index, x, errors


def _to_host(t, dtype):
    """A device tensor copied (without waiting) to host memory in the cache's dtype."""
    if t is None:
        return None
    t = t.to(dtype)
    if t.device.type == "cpu":
        return t
    import torch

    out = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def _cpu_fallback(source: ImageSource, backbone: Backbone):
    transform = backbone.preprocess.to_uint8()
    return lambda index: transform(source.load(index))


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
    decode: str = "auto",
    compile: bool | str = False,
    features: list[str] | None = None,
    layers: list[int] | None = None,
    views: str = "center",
) -> ExtractResult:
    """Extract one (backbone, dataset, split) into the cache; resumes and skips finished chunks.

    ``features`` (kinds, default ``["pooled"]``) and ``layers`` (blocks from the end) choose
    what is stored, one group per kind, all from one forward pass; ``views``: center, flip or
    center+flip (averaged); see :mod:`backbench.extract.kinds`.

    Another process extracting the same group holds its lock: this one waits (``on_wait`` is
    told), then does only what is left. ``decode``: "workers" (PIL in the DataLoader
    workers), "device" (JPEGs decoded on the extraction device, see
    :mod:`backbench.extract.decode`), "mixed" (both) or "auto" (mixed on a GPU; a resumed group keeps the
    decoding it was started with). ``compile``: wrap the forward pass in ``torch.compile``.
    """
    if not isinstance(cache, Cache) and not Location.of(default_cache_path(cache)).writable:
        cache = Cache(cache)  # opens read-only, creates nothing
    if isinstance(cache, Cache):
        cache.require_writable("extract")  # http(s):// caches are read-only: refuse before loading a model
    device = resolve_device(device)
    batch_size = batch_size or default_batch_size(device)
    model = backbone if isinstance(backbone, Backbone) else load_backbone(backbone)
    src = limit_source(source if isinstance(source, ImageSource) else open_source(source, split), limit)
    # a cache named by path is opened (made, if new) only now: a backbone or data source that
    # fails to load leaves no empty cache behind
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    if decode == "auto" and not overwrite:
        with locked(local_folder(cache.path)):  # not while another process creates the group
            held = cache.group(model.name, dataset, split) if (model.name, dataset, split) in cache else None
        if held is not None:
            decode = started_decode(held.attrs.get("preprocess", {})) if src.has_bytes else "workers"
    decode = resolve_decode(decode, device, src)
    kinds, view = expand(features, layers), check_view(views)
    attrs = group_attrs(model, src, dataset, split, dtype, provenance(decode, device), kinds[0], view)
    if cache.is_url and shard[0] > 0:  # no locks at URLs: shard 0 alone creates the group
        _await_group(cache, attrs, len(src), shard, on_wait)
    dims = _kind_dims(model, kinds)
    if chunk_rows is None and len(kinds) > 1:  # one chunking for all kinds: the widest sets it
        chunk_rows = chunk_rows_for(max(dims.values()), np.dtype(dtype).itemsize, len(src))
        chunk_rows = chunk_rows // batch_size * batch_size if chunk_rows >= batch_size else chunk_rows
    # One lock per (backbone, dataset, split), outside the group's folder, taken before the group
    # is opened or replaced: a second whole-group run (or an --overwrite) waits instead of tearing
    # the first one's group. Shards own disjoint chunks and share it; an overwrite holds it alone.
    with group_locked(cache.path, cache.group_path(model.name, dataset, split), on_wait,
                      shared=shard[1] > 1 and not overwrite):
        with locked(local_folder(cache.path)):
            groups = {k: open_or_create(cache, {**attrs, "feature_kind": group_attrs(
                                            model, src, dataset, split, dtype, kind=k, view=view)["feature_kind"]},
                                        len(src), dims[k], model.num_classes if k == "pooled" else 0,
                                        overwrite=overwrite, chunk_rows=chunk_rows, batch_size=batch_size,
                                        kind=stored_kind(k, view))
                      for k in kinds}
        for g in groups.values():  # chunk files a killed run left half-written
            clean_partials(local_folder(cache.path, g.path))
        return _extract_pending(model, groups, src, batch_size=batch_size, device=device, workers=workers,
                                shard=shard, on_error=on_error, progress=progress, decode=decode,
                                compile=compile, view=view)


def _kind_dims(model: Backbone, kinds: list[str]) -> dict[str, int]:
    """Width of each kind, from one forward pass of a blank image."""
    if kinds == ["pooled"]:
        return {"pooled": model.feature_dim}
    import torch

    from backbench.extract.kinds import kinds_forward

    c, h, w = model.preprocess.input_size
    with torch.inference_mode():
        feats, _ = kinds_forward(model, torch.zeros(1, c, h, w), kinds)
    return {k: int(v.shape[-1]) for k, v in feats.items()}


SHARD_WAIT_S = 600.0  # how long shards 1..N-1 of a URL cache wait for shard 0 to create the group


def _await_group(cache: Cache, attrs: dict[str, Any], n: int, shard: tuple[int, int],
                 on_wait: Callable[[], None] | None, timeout: float = SHARD_WAIT_S) -> None:
    """Wait until shard 0 has created the group (made as ``attrs`` asks) in a cache at a URL.

    Stores at URLs have no cross-process locks, so shards that all created the group at once
    would replace one another's chunks; only shard 0 creates it, the others open it.
    """
    key = group_key(attrs)
    deadline, told = time.monotonic() + timeout, False
    while True:
        if key in cache:
            group = cache.group(*key)
            if not _mismatch(group.attrs, attrs) and group.n == n:
                return
        if time.monotonic() > deadline:
            raise CacheError(
                f"shard {shard[0]}/{shard[1]} waited {timeout:.0f}s for shard 0/{shard[1]} to create "
                f"{cache.group_path(*key)} in {cache.path}; start shard 0 (it creates groups at URLs) and rerun"
            )
        if on_wait and not told:
            on_wait()
            told = True
        time.sleep(0.5)


def _extract_pending(model: Backbone, groups: dict[str, FeatureGroup], src: ImageSource, *, batch_size: int,
                     device: str, workers: int | None, shard: tuple[int, int], on_error: str,
                     progress: Progress | None, decode: str, compile: bool | str, view: str = "center") -> ExtractResult:
    group = next(iter(groups.values()))
    if len({g.chunk_rows for g in groups.values()}) > 1:
        raise CacheMismatch(f"the feature kinds of {group.path} were stored with different chunkings; "
                            f"extract them again with --overwrite")
    batches = plan_batches(list(groups.values()), batch_size, shard)
    dataset, split = group.attrs["dataset"], group.attrs["split"]
    result = ExtractResult(model.name, dataset, split, len(src), "up-to-date", group=group.path)
    if not batches:
        for g in groups.values():
            if not g.attrs.get("complete") and g.is_complete:
                g.finalize()
        return result
    device = resolve_device(device)
    started = time.perf_counter()
    if progress:  # the progress bar's clock starts with this one (the rate of the final line)
        progress(0, sum(map(len, batches)))
    skipped, result.decoded_on_device, (result.first_batch_s, result.waited_s) = run_batches(
        model, groups, src, batches, device=device, workers=default_workers(decode) if workers is None else workers,
        on_error=on_error, progress=progress, decode=decode, compile=compile, view=view)
    seconds = time.perf_counter() - started
    result.rows_written = sum(map(len, batches))
    result.seconds, result.images_per_s = seconds, result.rows_written / max(seconds, 1e-9)
    result.skipped = skipped
    fresh = {s["id"] for s in skipped}
    for g in groups.values():
        previous = [s for s in g.attrs.get("skipped", []) if s["id"] not in fresh]
        g.finalize({"skipped": previous + skipped,
                    "extraction": {"device": device, "batch_size": batch_size, "decode": decode,
                                   "decoded_on_device": result.decoded_on_device,
                                   "first_batch_s": round(result.first_batch_s, 2),
                                   "waited_s": round(result.waited_s, 2),
                                   "compile": compile, "images_per_s": round(result.images_per_s, 2)}})
    result.status = "extracted" if all(g.is_complete for g in groups.values()) else "partial"
    return result
