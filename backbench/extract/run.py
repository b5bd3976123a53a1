"""The extraction loop: images -> frozen backbone -> row chunks of the Zarr cache.

Batches never cross a row chunk, so a resumed or sharded run computes exactly the batches
an uninterrupted run would, and writes whole chunks only. Each chunk's checksum is written
after its data: a chunk without one is redone on the next run. The parts: the loader
(:mod:`~backbench.extract.loader`), the device pipeline (:mod:`~backbench.extract.prefetch`),
the chunk writers (:mod:`~backbench.extract.writer`) and the groups
(:mod:`~backbench.extract.groups`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from backbench.device import default_batch_size, resolve_device
from backbench.errors import BackbenchError, CacheMismatch, SampleError
from backbench.extract.backbones import Backbone, load_backbone
from backbench.extract.datasets import ImageSource, limit_source, open_source
from backbench.extract.decode import ON_DEVICE, DeviceDecoder, provenance, resolve_decode, started_decode
from backbench.extract.flops import forward_gflops
from backbench.extract.groups import await_group, batch_chunk_rows, group_attrs, open_or_create
from backbench.extract.kinds import for_maps, size_line
from backbench.extract.loader import Waits, make_loader
from backbench.extract.prefetch import DevicePipeline
from backbench.extract.writer import KindWriters
from backbench.kinds import check_view, expand, is_map, stored_kind
from backbench.store.cache import Cache, default_cache_path
from backbench.store.cleanup import clean_partials
from backbench.store.group import FeatureGroup
from backbench.store.location import Location
from backbench.store.lock import group_locked, local_folder, locked

__all__ = ["ExtractResult", "default_workers", "extract", "forward_step", "group_attrs",
           "open_or_create", "plan_batches", "run_batches"]

Progress = Callable[[int, int], None]
Ran = tuple[list[dict[str, str]], int | None, tuple[float, float]]  # skipped, decoded on device, waits


@dataclass
class ExtractResult:
    """What one extraction did: rows written, speed, skipped samples, how long it waited."""

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
    dense_labels: str = ""  # the group of the source's dense labels (masks, boxes), for a dense source

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_workers(decode: str) -> int:
    """All cores; with ``decode="mixed"`` two fewer, which the main process's threads (forward,
    device decoding, writing) keep while the workers decode."""
    cores = os.cpu_count() or 1
    return max(1, cores - 2) if decode == "mixed" else cores


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


def forward_step(backbone: Backbone, device: str, compile: bool | str = False, kinds: list[str] | None = None,
                 view: str = "center", map_grid: tuple[int, int] | None = None):
    """uint8 NCHW on the device -> ({kind: features}, logits): normalize, channels-last and
    bf16 on CUDA, the forward pass (the mirrored image too for the ``flip`` views); compiled
    with ``torch.compile`` when asked (``True`` or a backend). Without ``kinds``: the pooled
    ``(features, logits)`` pair. Maps (B, h, w, d) come out as rows of h*w*d, row-major."""
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
            feats, logits = kinds_forward(backbone, x, kinds, map_grid)
            return {k: v.flatten(1) if v.ndim == 4 else v for k, v in feats.items()}, logits

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
                decode: str = "workers", compile: bool | str = False, view: str = "center",
                map_grid: tuple[int, int] | None = None) -> Ran:
    """Forward every batch and hand its rows to the chunk writers (one group per feature kind,
    the backbone's logits with the pooled one); returns the skipped samples, how many
    images the device decoded (None with worker decoding), and the seconds the loop waited
    for its first batch and for all later ones."""
    import torch

    # Streams, events and copies go to the current device: make it this one (--device cuda:1).
    with torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext():
        return _run_batches(backbone, group, source, batches, device=device, workers=workers, on_error=on_error,
                            progress=progress, decode=decode, compile=compile, view=view, map_grid=map_grid)


def _run_batches(backbone: Backbone, group: FeatureGroup | dict[str, FeatureGroup], source: ImageSource,
                 batches: list[list[int]], *, device: str, workers: int, on_error: str, progress: Progress | None,
                 decode: str = "workers", compile: bool | str = False, view: str = "center",
                 map_grid: tuple[int, int] | None = None) -> Ran:
    """:func:`run_batches` on its device."""
    import torch

    groups = group if isinstance(group, dict) else {"pooled": group}
    cuda, writers, pipe = device.startswith("cuda"), KindWriters(groups, source), None
    # The workers start first (pinned batches, on the loader's pinning thread, unless all of it
    # is bytes for the device): they fill the pipeline while the model moves to the device,
    # and are forked before the CUDA context exists where it does not yet.
    loader = make_loader(source, backbone, batches, workers, pin=cuda and decode != "device", decode=decode)
    waits = Waits(loader, loader.dataset.pace if workers else None)
    try:
        fallback = _cpu_fallback(source, backbone)
        decoder = DeviceDecoder(backbone.preprocess, device, fallback) if decode in ON_DEVICE else None
        out_dtype = getattr(torch, np.dtype(next(iter(groups.values())).dtype).name)
        pipe = DevicePipeline(waits, device, decoder, out_dtype)  # warms the decoder up on its thread
        backbone.model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
        step = forward_step(backbone, device, compile, list(groups), view, map_grid)
        total, done, skipped = sum(map(len, batches)), 0, []
        for index, x, errors in pipe:
            for tag, feats, logits in pipe.forward(step, x, _labelled(source, index, errors, on_error, skipped)):
                writers.add(*tag, feats, logits)
            done += len(index)
            if progress:
                progress(done, total)
        for tag, feats, logits in pipe.landed():
            writers.add(*tag, feats, logits)
    finally:
        waits.close()
        if pipe is not None:
            pipe.close()
        writers.close()
        backbone.model.to("cpu")
    return skipped, (decoder.decoded if decoder is not None else None), (waits.first, waits.after)


def _labelled(source: ImageSource, index, errors: list[str], on_error: str,
              skipped: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's rows and labels; an unreadable sample fails the run (``on_error="fail"``) or
    is recorded in ``skipped`` and labelled -1."""
    bad = [(int(i), e) for i, e in zip(index, errors) if e]
    if bad and on_error == "fail":
        raise SampleError(f"{bad[0][1]} (sample {source.ids[bad[0][0]]!r}); "
                          f"fix or remove it, or pass --on-error skip")
    rows = index.numpy()
    labels = source.labels[rows].copy()
    for i, err in bad:
        labels[rows == i] = -1
        skipped.append({"id": source.ids[i], "error": err})
    return rows, labels


def _cpu_fallback(source: ImageSource, backbone: Backbone):
    """The workers' decoding of one sample, for the JPEGs the device cannot decode."""
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
    map_grid: tuple[int, int] | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Extract one (backbone, dataset, split) into the cache; resumes and skips finished chunks.

    ``features`` (kinds, default ``["pooled"]``) and ``layers`` (blocks from the end) choose
    what is stored, one group per kind, all from one forward pass; ``views``: center, flip or
    center+flip (averaged); see :mod:`backbench.extract.kinds`. Map kinds (``map``,
    ``layer-N:map``) see the whole image resized to the input size (no crop), in runs of their
    own; ``map_grid`` (H, W) average-pools their maps down; ``on_plan`` is told the size they
    will write before the forward passes start. A dense source's labels (masks, boxes) are
    written to the cache once per (dataset, split): :mod:`backbench.store.dense`.

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
    kinds, view = expand(features, layers), check_view(views)  # refused before a model loads
    maps = is_map(kinds[0])
    _check_maps(kinds, view, map_grid)
    device = resolve_device(device)
    batch_size = batch_size or default_batch_size(device)
    model = backbone if isinstance(backbone, Backbone) else load_backbone(backbone)
    model = for_maps(model) if maps else model
    src = limit_source(source if isinstance(source, ImageSource) else open_source(source, split), limit)
    # a cache named by path is opened (made, if new) only now: a backbone or data source that
    # fails to load leaves no empty cache behind
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    key = (model.name, dataset, split, stored_kind(kinds[0], view))
    decode = _decoding(cache, key, src, decode, device, overwrite)
    attrs = group_attrs(model, src, dataset, split, dtype, provenance(decode, device), kinds[0], view, map_grid)
    if overwrite or key not in cache:  # counted once, for a new group: a resumed one keeps its count
        attrs["backbone_info"] = {**attrs["backbone_info"], "gflops": forward_gflops(model)}
    if cache.is_url and shard[0] > 0:  # no locks at URLs: shard 0 alone creates the group
        await_group(cache, attrs, len(src), shard, on_wait)
    dense = _dense_labels(cache, src, dataset, split, shard, overwrite)  # first: refused labels leave no empty group
    with _held_groups(cache, model, src, attrs, kinds, view, shard=shard, overwrite=overwrite,
                      chunk_rows=chunk_rows, batch_size=batch_size, on_wait=on_wait, map_grid=map_grid) as groups:
        batches = plan_batches(list(groups.values()), batch_size, shard)
        if batches and on_plan and maps:
            on_plan(size_line(sum(map(len, batches)), {k: g.attrs["map_shape"] for k, g in groups.items()}, dtype))
        result = _extract_pending(model, groups, src, batches, batch_size=batch_size, device=device,
                                  workers=workers, on_error=on_error, progress=progress, decode=decode,
                                  compile=compile, view=view, map_grid=map_grid)
        result.dense_labels = dense
        return result


def _check_maps(kinds: list[str], view: str, map_grid: tuple[int, int] | None) -> None:
    """Map kinds take the center view only; ``map_grid`` is two sizes, for map kinds only."""
    if not is_map(kinds[0]):
        if map_grid:
            raise BackbenchError(f"--map-grid pools feature maps; extract --features map (not {', '.join(kinds)})")
        return
    if view != "center":
        raise BackbenchError(f"--views {view}: feature maps are extracted for the center view only")
    if map_grid is not None and (len(map_grid) != 2 or min(map_grid) < 1):
        raise BackbenchError(f"--map-grid {' '.join(map(str, map_grid))}: give two sizes >= 1, e.g. --map-grid 4 4")


def _dense_labels(cache: Cache, src: ImageSource, dataset: str, split: str, shard: tuple[int, int],
                  overwrite: bool) -> str:
    """Write a dense source's labels once per (dataset, split) (shard 0 does it); their group path."""
    if not getattr(src, "dense", None):
        return ""
    from backbench.store.dense import dense_path, write_dense_labels

    if shard[0] == 0:
        write_dense_labels(cache, dataset, split, src, overwrite=overwrite)
    return dense_path(dataset, split)


def _decoding(cache: Cache, key: tuple[str, str, str, str], src: ImageSource, decode: str, device: str,
              overwrite: bool) -> str:
    """The decoding to run; with "auto" a resumed group keeps the one it was started with."""
    if decode == "auto" and not overwrite:
        with locked(local_folder(cache.path)):  # not while another process creates the group
            held = cache.group(*key) if key in cache else None
        if held is not None:
            decode = started_decode(held.attrs.get("preprocess", {})) if src.has_bytes else "workers"
    return resolve_decode(decode, device, src)


@contextlib.contextmanager
def _held_groups(cache: Cache, model: Backbone, src: ImageSource, attrs: dict[str, Any], kinds: list[str],
                 view: str, *, shard: tuple[int, int], overwrite: bool, chunk_rows: int | None, batch_size: int,
                 on_wait: Callable[[], None] | None,
                 map_grid: tuple[int, int] | None = None) -> Iterator[dict[str, FeatureGroup]]:
    """The group of each feature kind, opened (or made) under the group's lock, which is held
    until the run ends; chunk files a killed run left half-written are removed first. A map
    kind's group records its ``map_shape`` [h, w, d] (its features are the rows of h*w*d)."""
    shapes = _kind_shapes(model, kinds, map_grid)
    dims = {k: int(np.prod(s)) for k, s in shapes.items()}
    if chunk_rows is None and len(kinds) > 1:  # one chunking for all kinds: the widest sets it
        chunk_rows = batch_chunk_rows(max(dims.values()), np.dtype(attrs["dtype"]).itemsize, len(src), batch_size)
    # One lock per (backbone, dataset, split), outside the group's folder, taken before the group
    # is opened or replaced: a second whole-group run (or an --overwrite) waits instead of tearing
    # the first one's group. Shards own disjoint chunks and share it; an overwrite holds it alone.
    with group_locked(cache.path, cache.group_path(model.name, attrs["dataset"], attrs["split"]), on_wait,
                      shared=shard[1] > 1 and not overwrite):
        with locked(local_folder(cache.path)):
            groups = {k: open_or_create(cache, {**attrs, "feature_kind": stored_kind(k, view),
                                                **({"map_shape": list(shapes[k])} if is_map(k) else {})},
                                        len(src), dims[k], model.num_classes if k == "pooled" else 0,
                                        overwrite=overwrite, chunk_rows=chunk_rows, batch_size=batch_size,
                                        kind=stored_kind(k, view))
                      for k in kinds}
        for g in groups.values():  # chunk files a killed run left half-written
            clean_partials(local_folder(cache.path, g.path))
        yield groups


def _kind_shapes(model: Backbone, kinds: list[str], map_grid: tuple[int, int] | None = None) -> dict[str, list[int]]:
    """Each kind's shape per image ([d], or [h, w, d] for maps), from one forward pass of a blank image."""
    if kinds == ["pooled"]:
        return {"pooled": [model.feature_dim]}
    import torch

    from backbench.extract.kinds import kinds_forward

    c, h, w = model.preprocess.input_size
    with torch.inference_mode():
        feats, _ = kinds_forward(model, torch.zeros(1, c, h, w), kinds, map_grid)
    return {k: [int(n) for n in v.shape[1:]] for k, v in feats.items()}


def _extract_pending(model: Backbone, groups: dict[str, FeatureGroup], src: ImageSource, batches: list[list[int]],
                     *, batch_size: int, device: str, workers: int | None, on_error: str,
                     progress: Progress | None, decode: str, compile: bool | str, view: str = "center",
                     map_grid: tuple[int, int] | None = None) -> ExtractResult:
    """Run ``batches`` (planned by :func:`plan_batches`) into ``groups`` and finalize them."""
    group = next(iter(groups.values()))
    if len({g.chunk_rows for g in groups.values()}) > 1:
        raise CacheMismatch(f"the feature kinds of {group.path} were stored with different chunkings; "
                            f"extract them again with --overwrite")
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
        on_error=on_error, progress=progress, decode=decode, compile=compile, view=view, map_grid=map_grid)
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
