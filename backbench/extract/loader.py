"""The host side of extraction: the torch Dataset over an image source, its collate for device
decoding, and the DataLoader over a run's planned batches (timed, so a run can say how long the
device waited for images)."""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterator

import numpy as np

from backbench.extract.backbones import Backbone
from backbench.extract.datasets import ImageSource
from backbench.extract.decode import ON_DEVICE, LoaderPace, jpeg_payload


class Images:
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


def collate_packed(batch):
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


def unpack(packed) -> list:
    """The per-sample payloads of :func:`collate_packed`: byte views and decoded images."""
    jpeg, data, lengths, images = packed
    chunks, decoded = iter(data.split(lengths.tolist())), iter(images)
    return [next(chunks) if j else next(decoded) for j in jpeg.tolist()]


def make_loader(source: ImageSource, backbone: Backbone, batches: list[list[int]], workers: int, pin: bool,
                decode: str = "workers"):
    """A DataLoader yielding ``batches`` in order: (indices, images or packed bytes, errors)."""
    from torch.utils.data import DataLoader

    ds = Images(source, backbone.preprocess.to_uint8(), backbone.preprocess.input_size, decode,
                positions={b[0]: p for p, b in enumerate(batches)} if decode == "mixed" else None)
    kw: dict[str, Any] = {"prefetch_factor": 4, "persistent_workers": False} if workers else {}
    if decode in ON_DEVICE:
        kw["collate_fn"] = collate_packed
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, pin_memory=pin, **kw)


class Waits:
    """Iterates a loader, timing how long each batch kept the main process waiting (the
    device idle for want of images) and telling each take to the workers' pace (``mixed``)."""

    def __init__(self, loader, pace: LoaderPace | None = None) -> None:
        self.pace = pace
        self.first = 0.0  # from starting the workers to the first batch
        self.after = 0.0  # every later batch
        self.started = time.monotonic()
        self.batches = iter(loader)  # starts the workers

    def __iter__(self) -> Iterator:
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
