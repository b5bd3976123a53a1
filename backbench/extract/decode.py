"""Decoding JPEGs on the extraction device (nvJPEG on a GPU) instead of in the workers.

With ``decode="device"`` the DataLoader workers only read each file's bytes and look at its
header; the main process decodes a whole batch with one call of
:func:`torchvision.io.decode_jpeg` on the device, then resizes and crops on the device with
the same torchvision functions the workers use. Anything that is not a plain RGB or
grayscale JPEG (PNG, CMYK, oversized, ...) is decoded by the worker as usual, and a JPEG the
device refuses is decoded on the CPU in the main process, so each sample gets the same
treatment (and the same errors) as in ``decode="workers"``.

With ``decode="mixed"`` (DALI's name for its CPU+GPU decoder) the workers also decode on the
CPU as many of their batch's JPEGs as they can before the main process needs that batch
(:class:`LoaderPace`) and send the rest as bytes: where the CPU keeps up on its own the
device decodes nothing, and where it cannot, the device decodes only what the CPU could not. Which image went which way depends
on timing; nvJPEG and libjpeg-turbo may differ by a level in a few pixels, so the group
records ``"decode": "torchvision-cuda+workers"``.
"""

from __future__ import annotations

import io
import time
import warnings
from typing import Any

from backbench.errors import BackbenchError
from backbench.extract.preprocess import Preprocess

DECODES = ("auto", "workers", "device", "mixed")
ON_DEVICE = ("device", "mixed")  # the decodings that send JPEG bytes to the device
_JPEG_MAGIC = b"\xff\xd8\xff"


def resolve_decode(decode: str, device: str, source) -> str:
    """``auto``: mixed (the workers and the GPU) when the device is a GPU and the source reads
    files, else the workers; mixed beat both on an H200 (README, "On a GPU")."""
    if decode not in DECODES:
        raise BackbenchError(f"--decode {decode!r} is not one of {', '.join(DECODES)}")
    if decode == "auto":
        return "mixed" if device.startswith("cuda") and source.has_bytes else "workers"
    if decode in ON_DEVICE and not source.has_bytes:
        raise BackbenchError(f"--decode {decode} needs image files; {source.spec.split(':')[0]} images are "
                             f"decoded in the workers (use --decode workers)")
    return decode


def provenance(decode: str, device: str) -> dict[str, str]:
    """What goes into the group's preprocessing record (nothing for worker decoding)."""
    if decode == "workers":
        return {}
    return {"decode": f"torchvision-{device.split(':')[0]}" + ("+workers" if decode == "mixed" else "")}


def started_decode(preprocess: dict) -> str:
    """The decoding a group was started with, from its preprocessing record."""
    recorded = preprocess.get("decode")
    return "workers" if recorded is None else "mixed" if recorded.endswith("+workers") else "device"


class LoaderPace:
    """``decode="mixed"``: when the main process will take each batch from the DataLoader.

    Shared memory between the main process, which calls :meth:`took` as it takes each batch
    (in order), and the workers, which ask :meth:`allows` before each image they would decode
    on the CPU. The pace is the device's: the seconds between takes less any time the main
    process waited for the workers (a moving average from the fourth take on; the first
    takes come in a burst). Batch ``p`` is then taken about ``(p - taken + 1) * pace`` seconds
    after the last take; a worker decodes on the CPU while the batch would still be ready
    ``spare`` batches before that, and sends the rest as bytes for the device. ``spare``
    covers collating, pinning and jitter: it grows by one whenever the main process had to
    wait for a batch, and shrinks by a twentieth of a batch whenever it did not.

    So the workers decode everything when they keep up, and the device only what they could
    not: the split follows the backbone's speed and the CPU's, with nothing to tune. Until
    the pace is known the workers' first round of batches goes as bytes (the device starts
    at once) and later rounds decode on the CPU.
    """

    SPARE = (1.0, 2.0, 16.0)  # batches to spare: least, at first, most

    def __init__(self, clock=time.monotonic) -> None:
        import multiprocessing

        self.clock = clock  # time.monotonic is one clock for all the processes of a machine
        # batches taken, time of the last take, pace (0: unknown), batches to spare
        self.shared = multiprocessing.Array("d", [0.0, 0.0, 0.0, self.SPARE[1]])

    def took(self, waited: float = 0.0) -> None:
        """The main process took its next batch, after waiting ``waited`` seconds for it."""
        now = self.clock()
        least, _, most = self.SPARE
        with self.shared.get_lock():
            taken, last, pace, spare = self.shared[:]
            if taken >= 3:
                gap = max(now - last - waited, 0.0)
                pace = gap if pace == 0 else 0.75 * pace + 0.25 * gap
                spare = min(spare + 1, most) if waited > 0.1 * pace else max(spare - 0.05, least)
            self.shared[:] = [taken + 1, now, pace, spare]

    def allows(self, position: int, workers: int, per_image: float) -> bool:
        """Whether a worker may decode one more image (``per_image`` seconds) of batch
        ``position`` on the CPU and still have the batch ready ``spare`` batches early."""
        taken, last, pace, spare = self.shared[:]
        if pace == 0:
            return position >= workers
        return self.clock() + per_image < last + (position - taken + 1 - spare) * pace


def jpeg_payload(data: bytes):
    """The file's bytes as a 1-D uint8 tensor when the device can decode it, else None."""
    import torch
    from PIL import Image

    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only: size and mode
            w, h = img.size
            ok = img.format == "JPEG" and img.mode in ("RGB", "L")
            ok = ok and (Image.MAX_IMAGE_PIXELS is None or w * h <= Image.MAX_IMAGE_PIXELS)
    except Exception:
        return None  # the worker path decodes it and reports the error
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if ok else None


class DeviceDecoder:
    """Batches of (JPEG bytes | decoded uint8 CHW) -> one uint8 NCHW batch on ``device``."""

    def __init__(self, preprocess: Preprocess, device: str, fallback, drain: bool = True) -> None:
        self.preprocess, self.device = preprocess, device
        self.fallback = fallback  # index -> uint8 CHW tensor by the CPU path (raises SampleError)
        self.drain = drain and device.startswith("cuda")  # False only to measure the hazard (bench/gpu.py)
        self.decoded = 0  # images decoded on the device so far

    def warm_up(self) -> None:
        """Decode, resize and crop one tiny JPEG and wait for it, counting nothing: the device's
        first decode loads nvJPEG and the resize kernels (a second or two in a fresh process),
        and extraction runs this on the decode thread while the workers start, so the first
        batch does not pay for it. A device that cannot decode is left to the batches' own
        fallback (the CPU path), so errors here are ignored."""
        try:
            from PIL import Image
            import torch

            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (128, 64, 32)).save(buf, format="JPEG")
            image = self._decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)])[0]
            self._resize_crop([image])
            if self.device.startswith("cuda"):
                torch.cuda.current_stream(self.device).synchronize()
        except Exception:
            pass

    def _resize_crop(self, images: list[Any]):
        """Resize/crop each image as the workers would, batching images of equal size."""
        import torch

        h, w = self.preprocess.size
        resize_crop = self.preprocess.resize_crop()
        out = torch.empty((len(images), 3, h, w), dtype=torch.uint8, device=self.device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():
            out[torch.as_tensor(idx, device=self.device)] = resize_crop(torch.stack([images[i] for i in idx]))
        return out

    def _decode(self, data):
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.drain:
            # torchvision's CUDA decoder allocates its outputs on the current stream but nvJPEG
            # writes them from its own stream without waiting for this one (the hardware engine
            # ignores stream order: pytorch/vision#9606, meta-pytorch/torchcodec#1634), so it can
            # be handed, and overwrite, memory that queued kernels (the last batch's resize) still
            # read. Drain the stream first; this thread runs a batch ahead, so little is lost.
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; decode_jpeg works as before
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def __call__(self, indices: list[int], payloads: list[Any], stacked=None):
        """(uint8 NCHW batch on the device, {position: error}) for one batch of payloads.

        JPEG payloads (1-D byte tensors) are decoded on the device; the rest arrive decoded
        from the workers (``stacked``: the same images already in one tensor, in order) and
        reach the device in one copy. A JPEG the device refuses goes through the CPU path,
        whose error (if any) is the sample's error, exactly as with worker decoding.
        """
        import torch

        jpeg = [i for i, p in enumerate(payloads) if p.ndim == 1]
        decoded: dict[int, Any] = {}
        if jpeg:
            try:
                images = self._decode([payloads[i] for i in jpeg])
                decoded = dict(zip(jpeg, images))
            except RuntimeError:  # one bad file fails the batch: decode one by one
                for i in jpeg:
                    try:
                        decoded[i] = self._decode(payloads[i])
                    except RuntimeError:
                        pass
        self.decoded += len(decoded)
        h, w = self.preprocess.size
        out = torch.empty((len(payloads), 3, h, w), dtype=torch.uint8, device=self.device)
        if decoded:
            out[torch.as_tensor(list(decoded), device=self.device)] = self._resize_crop(list(decoded.values()))
        cpu = [i for i, p in enumerate(payloads) if p.ndim != 1]
        if cpu:
            self._put(out, cpu, stacked if stacked is not None else torch.stack([payloads[i] for i in cpu]))
        errors: dict[int, str] = {}
        refused = {}  # by the device: decoded on the CPU here, or the sample's error
        for i in jpeg:
            if i not in decoded:
                try:
                    refused[i] = self.fallback(indices[i])
                except Exception as exc:
                    errors[i] = str(exc) or type(exc).__name__
                    refused[i] = torch.zeros((3, h, w), dtype=torch.uint8)
        if refused:
            self._put(out, list(refused), torch.stack(list(refused.values())))
        return out, errors

    def _put(self, out, positions: list[int], host) -> None:
        """Copy host images into ``out`` at ``positions`` (pinned, one copy)."""
        import torch

        if self.device.startswith("cuda") and not host.is_pinned():
            host = host.pin_memory()
        out[torch.as_tensor(positions, device=self.device)] = host.to(self.device, non_blocking=True)
