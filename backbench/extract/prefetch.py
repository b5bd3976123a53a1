"""The device side of extraction, as one class shaped like timm's ``PrefetchLoader``: batches
go onto the device one step ahead of the forward pass, and its results come back to the host
one step behind it, so the host, the copies and the device overlap."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from backbench.extract.decode import DeviceDecoder
from backbench.extract.loader import unpack

Batch = tuple[Any, Any, list[str]]  # (indices, uint8 NCHW images on the device, error text per sample)


def on_stream(stream, fn: Callable, *args):
    """``fn(*args)`` with ``stream`` (None: no change) current on this thread."""
    import torch

    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return fn(*args)


def to_host(t, dtype):
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


class DevicePipeline:
    """Iterates ``loader``'s batches as device tensors, one step ahead; :meth:`forward` runs a
    step and returns the earlier batches whose results have reached the host.

    Without a ``decoder`` a batch of images is copied to ``device`` (asynchronously from pinned
    memory). With one (``decode`` device or mixed) the JPEG bytes are decoded on the device a
    batch ahead, on one thread and (on CUDA) a high-priority side stream: its few short kernels
    are what the next forward pass waits for, so they go first rather than queue behind the
    current forward pass's blocks. The forward pass then runs on its own (non-blocking) stream,
    so work that a library queues on the legacy default stream cannot serialize with it.
    Results are copied back without waiting; a batch is handed on once its copy has landed.
    """

    def __init__(self, loader: Iterable, device: str, decoder: DeviceDecoder | None = None,
                 out_dtype: Any = None) -> None:
        import torch

        self.loader, self.device, self.decoder, self.out_dtype = loader, device, decoder, out_dtype
        self.cuda = device.startswith("cuda")
        self.in_flight: list[tuple[Any, dict[str, Any], Any, Any]] = []
        self.pool = self.side = self.compute = None
        if decoder is not None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backbench-decode")
            self.side = torch.cuda.Stream(priority=-1) if self.cuda else None
            self.compute = torch.cuda.Stream() if self.cuda else None
            # the first decode loads the decoder (nvJPEG): done now, while the workers start
            self.pool.submit(on_stream, self.side, decoder.warm_up)

    def __iter__(self) -> Iterator[Batch]:
        if self.compute is not None:  # after the model's weights, queued on the current stream
            import torch

            self.compute.wait_stream(torch.cuda.current_stream())
        if self.decoder is None:
            for index, x, errors in self.loader:
                yield index, x.to(self.device, non_blocking=True), errors
            return
        pending = None
        for batch in self.loader:
            future = self.pool.submit(on_stream, self.side, self._decode, *batch)
            if pending is not None:
                yield self._ready(*pending.result())
            pending = future
        if pending is not None:
            yield self._ready(*pending.result())

    def _decode(self, index, packed, errors) -> tuple[Any, Any, list[str], Any]:
        """One packed batch decoded on the device (on the decode thread)."""
        x, late = self.decoder(index.tolist(), unpack(packed), stacked=packed[3])
        ready = self.side.record_event() if self.side is not None else None
        return index, x, [late.get(i, e) for i, e in enumerate(errors)], ready

    def _ready(self, index, x, errors, event) -> Batch:
        """Make the compute stream wait for a batch decoded on the side stream."""
        if event is not None:
            import torch

            stream = self.compute or torch.cuda.current_stream()
            stream.wait_event(event)
            x.record_stream(stream)
        return index, x, errors

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """The context the forward pass runs in: inference mode, on the compute stream."""
        import torch

        with torch.inference_mode(), torch.cuda.stream(self.compute) if self.compute is not None else \
                contextlib.nullcontext():
            yield

    def forward(self, step: Callable, x, tag: Any) -> list[tuple[Any, dict[str, Any], Any]]:
        """``step(x)`` -> ({kind: features}, logits) queued on the device with their copy back;
        returns the earlier batches now on the host as (``tag``, {kind: array}, logits array)."""
        import torch

        with self.computing():
            feats, logits = step(x)
            feats = {k: to_host(v, self.out_dtype) for k, v in feats.items()}
            logits, event = to_host(logits, self.out_dtype), None
            if self.cuda:
                event = torch.cuda.Event()
                event.record()
        self.in_flight.append((tag, feats, logits, event))
        return self.landed(keep=1)

    def landed(self, keep: int = 0) -> list[tuple[Any, dict[str, Any], Any]]:
        """The batches in flight, oldest first, all but the newest ``keep``, once on the host."""
        out = []
        while len(self.in_flight) > keep:
            tag, feats, logits, event = self.in_flight.pop(0)
            if event is not None:
                event.synchronize()
            out.append((tag, {k: v.numpy() for k, v in feats.items()},
                        logits.numpy() if logits is not None else None))
        return out

    def close(self) -> None:
        """Let the decode thread finish (after an error too)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
