"""GPU throughput of ViT-B/16 (random init): bare forward vs end-to-end extraction.

(a) the bare forward pass on uint8 tensors already on the device, bf16 autocast,
    channels-last (eager, and with ``torch.compile``); (b) ``backbench extract`` from JPEG
    files into a cache, JPEGs decoded on the GPU (``--decode device``), by the workers in
    time and the GPU the rest (``--decode mixed``), and by PIL in the DataLoader workers.
    Targets on an H100/H200: (a) >= 8,000 images/s, (b) >= 0.8 of (a).

    Each extraction reports its wall-clock rate (listing, worker start-up and model transfer
    included), its steady rate (over the second half of the batches, after the burst of
    batches the workers prefetched at start-up) and where the rest of the time went. A
    profiler trace of a few batches of ``--decode device`` is summarized per CUDA stream and
    per host thread (``--trace DIR`` also keeps the Chrome trace), to show what the forward
    pass waits for.

    python bench/gpu.py [--images 80000] [--batch-size 512] [--json out.json] [--no-compile] [--compile] [--trace DIR]
    python bench/gpu.py --quick [--decodes mixed] [--images 1281167]   # (a) eager, device and mixed only
    python bench/gpu.py --device cpu --model timm:test_vit@random --images 2048 --batch-size 64

(c) ``--probe``: the linear probe's C sweep at ImageNet size instead (1,281,167 x 1,024
    float16 features, 1,000 classes, the 13-value grid, holdout selection and final fit) from
    a Zarr array, read and swept on the device in float32 (no TF32: scikit-learn's objective).
    Target on one H200: under 60 s from the Zarr read to the final fit.

    python bench/gpu.py --probe [--json out.json]
    python bench/gpu.py --probe --device cpu --probe-rows 20000 --probe-d 64 --probe-classes 10   # smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

DEVICE = "cuda"  # a CPU smoke run of the extraction parts sets "cpu"


def bare(backbone, batch_size: int, compile: bool, steps: int = 40) -> float:
    """Images/s of the same step extraction runs (normalize, channels-last, bf16, forward)."""
    import torch

    from backbench.extract.run import forward_step

    cuda = DEVICE == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    backbone.model.to(DEVICE, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    step = forward_step(backbone, DEVICE, compile)
    c, h, w = backbone.preprocess.input_size
    x = torch.randint(0, 256, (batch_size, c, h, w), dtype=torch.uint8, device=DEVICE)
    with torch.inference_mode():
        for i in range(steps + 5):
            if i == 5:
                sync()
                start = time.perf_counter()
            feats, _ = step(x)
        sync()
    backbone.model.to("cpu")
    return steps * batch_size / (time.perf_counter() - start)


def photo_like_jpegs(n: int, folder: Path, size: tuple[int, int] = (500, 375), copies: bool = False) -> Path:
    """n JPEG files of ImageNet's typical size (500x375, quality 90; 64 smooth random scenes) in
    ImageNet's layout (about 1,300 per class folder, at most 1,000 folders). Each file is a
    hard link to one of the 64 scenes, so ImageNet's 1.28M files take seconds and 5 MB rather
    than minutes and 95 GB; reading one is the same open/read/close from the page cache as
    reading a copy (``copies=True`` writes copies, as does a file system without links)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    w, h = size
    scenes = folder / "scenes"
    scenes.mkdir(parents=True, exist_ok=True)
    blobs = []
    for j in range(64):
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.DETAIL)
        noise = rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        (scenes / f"{j}.jpg").write_bytes(blobs[-1])
    classes = min(1000, max(10, n // 1300))
    root = folder / "images"
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"n{i % classes:08d}" / f"{i:07d}.JPEG"
        if not copies:
            try:
                os.link(scenes / f"{i % 64}.jpg", path)
                continue
            except OSError:
                copies = True
        path.write_bytes(blobs[i % 64])
    return root


def decode_only(root: Path, batch_size: int) -> float:
    """Images/s of torchvision's batched decode_jpeg on the GPU alone (bytes already in memory)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted(root.rglob("*.JPEG"))[: batch_size * 10]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    decode_jpeg(data[:batch_size], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(data), batch_size):
        decode_jpeg(data[i : i + batch_size], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def decode_and_forward(bb, root: Path, batch_size: int, overlapped: bool = False, drain: bool = True,
                       check: bool = False) -> dict:
    """Images/s of GPU decode + resize + forward over JPEG bytes already in memory (no loader,
    no copies back, no writes): one after the other, or ``overlapped`` as extraction runs it
    (decoding one batch ahead on a thread and a high-priority side stream, the forward pass
    on its own stream). ``drain=False`` drops the stream drain that guards against
    torchvision's CUDA decoder overwriting memory still in use (see DeviceDecoder._decode);
    ``check`` compares every decoded image with the workers' CPU decoding of the same file
    (files shuffled, so that consecutive batches differ)."""
    import torch

    from backbench.extract.decode import DeviceDecoder
    from backbench.extract.datasets import open_rgb
    from backbench.extract.loader import collate_packed
    from backbench.extract.prefetch import DevicePipeline
    from backbench.extract.run import forward_step

    cuda = DEVICE == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    files = sorted(root.rglob("*.JPEG"))
    if check:
        files = [files[i] for i in np.random.default_rng(1).permutation(len(files))]
    files = files[: batch_size * 12]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    bb.model.to(DEVICE, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    decoder, step = DeviceDecoder(bb.preprocess, DEVICE, None, drain=drain), forward_step(bb, DEVICE)
    pipe = None
    if overlapped:  # the decode thread and streams, as extraction has them
        packed = (collate_packed([(i, d, "") for i, d in enumerate(data[j : j + batch_size], j)])
                  for j in range(0, len(data), batch_size))
        pipe = DevicePipeline(packed, DEVICE, decoder)
        batches = (x for _, x, _ in pipe)
    else:
        batches = (decoder(list(range(batch_size)), data[i : i + batch_size])[0]
                   for i in range(0, len(data), batch_size))
    kept = []
    with torch.inference_mode(), torch.cuda.stream(pipe.compute if pipe else None):  # None: the current one
        for i, x in enumerate(batches):
            if i == 2:
                sync()
                start = time.perf_counter()
            step(x)
            if check:
                kept.append(x.clone())
        sync()
    if pipe is not None:
        pipe.close()
    out: dict = {"images_per_s": round((len(data) - 2 * batch_size) / (time.perf_counter() - start), 1)}
    bb.model.to("cpu")
    if check:
        tf, reference = bb.preprocess.to_uint8(), {}  # CPU decodes, once per distinct file content
        got = torch.cat(kept).cpu()
        diff = []
        for i, (f, d) in enumerate(zip(files, data)):
            key = d.numpy().tobytes()
            if key not in reference:
                reference[key] = tf(open_rgb(f)).int()
            diff.append((got[i].int() - reference[key]).abs().float().mean().item())
        out.update(images_checked=len(diff), worst_mean_abs_diff=round(max(diff), 2),
                   images_over_8=sum(d > 8 for d in diff))
    return out


def decode_resize_only(bb, root: Path, batch_size: int) -> float:
    """Images/s of backbench's device decoding alone: decode_jpeg, resize and crop on the GPU."""
    import torch

    from backbench.extract.decode import DeviceDecoder

    files = sorted(root.rglob("*.JPEG"))[: batch_size * 10]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    decoder = DeviceDecoder(bb.preprocess, "cuda", None)
    decoder(list(range(batch_size)), data[:batch_size])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(data), batch_size):
        decoder(list(range(batch_size)), data[i : i + batch_size])
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


class _CallTimes:
    """Seconds spent in some of ``backbench.extract.run``'s set-up steps (module functions
    wrapped for the duration), and when the batch loop began, relative to ``start``."""

    NAMES = ("open_source", "open_or_create", "forward_step", "make_loader")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def __enter__(self):
        from backbench.extract import run

        self.saved = {n: getattr(run, n) for n in (*self.NAMES, "_run_batches")}
        for name in self.NAMES:
            setattr(run, name, self._timed(name, self.saved[name]))
        loop = self.saved["_run_batches"]

        def began(*a, **kw):
            self.seconds["loop_began_at"] = time.perf_counter() - self.start
            return loop(*a, **kw)

        run._run_batches = began
        return self

    def _timed(self, name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    def __exit__(self, *exc):
        from backbench.extract import run

        for name, fn in self.saved.items():
            setattr(run, name, fn)

    def report(self) -> dict:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def end_to_end(bb, root: Path, folder: Path, batch_size: int, decode: str, compile: bool, limit: int | None,
               profiler=None) -> dict:
    from backbench.extract.run import extract

    cache = folder / f"c-{decode}-{int(compile)}.zarr"
    marks: list[tuple[float, int]] = []

    def progress(done: int, total: int) -> None:
        marks.append((time.perf_counter(), done))
        if profiler is not None:
            profiler.step()

    with _CallTimes() as calls:
        start = calls.start
        res = extract(bb, f"imagefolder:{root}", cache=str(cache), dataset="gpu", split="bench",
                      batch_size=batch_size, device=DEVICE, workers=None, decode=decode, compile=compile,
                      limit=limit, progress=progress)
        wall = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    t0, n0 = next(m for m in marks if m[1] >= res.rows_written // 2)
    steady = (marks[-1][1] - n0) / max(marks[-1][0] - t0, 1e-9)
    out = {"images": res.rows_written, "wall_images_per_s": round(res.rows_written / wall, 1),
           "steady_images_per_s": round(steady, 1),
           "reported_images_per_s": round(res.images_per_s, 1),  # what `backbench extract` prints: the batch loop
           "until_first_batch_done_s": round(marks[0][0] - start, 2),  # set-up, worker start, first batch
           "waited_for_first_batch_s": round(res.first_batch_s, 2),  # of which: the loader's first batch
           "waited_for_later_batches_s": round(res.waited_s, 2),  # the loop idle for want of images
           "after_last_batch_s": round(start + wall - marks[-1][0], 2), "set_up_s": calls.report()}
    if res.decoded_on_device is not None:
        out["decoded_on_device"] = round(res.decoded_on_device / res.rows_written, 3)
    return out


def profile_device_decode(bb, root: Path, folder: Path, batch_size: int, keep: Path | None) -> dict:
    """A profiler trace of batches 7-11 of ``extract --decode device``, summarized."""
    from torch.profiler import ProfilerActivity, profile, schedule

    trace = (keep or folder) / "device-decode.trace.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=4, warmup=2, active=5, repeat=1),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace))) as prof:
        end_to_end(bb, root, folder, batch_size, "device", False, batch_size * 14, profiler=prof)
    return summarize_trace(json.loads(trace.read_text()))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    total, j = 0.0, 0
    for a, b in x:
        while j < len(y) and y[j][1] <= a:
            j += 1
        k = j
        while k < len(y) and y[k][0] < b:
            total += min(b, y[k][1]) - max(a, y[k][0])
            k += 1
    return total


def summarize_trace(trace: dict) -> dict:
    """Per CUDA stream: busy ms, kernels, top kernels; busy overlap between streams; per host
    thread: the CUDA runtime calls that took longest in total (synchronizations, allocations)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"note": "no GPU activity in the trace"}
    span = (max(e["ts"] + e["dur"] for e in gpu) - min(e["ts"] for e in gpu)) / 1e3
    streams: dict[str, list[dict]] = {}
    for e in gpu:
        streams.setdefault(str(e.get("args", {}).get("stream", e.get("tid"))), []).append(e)
    busy = {s: _union([(e["ts"], e["ts"] + e["dur"]) for e in es]) for s, es in streams.items()}
    out: dict = {"gpu_span_ms": round(span, 1), "gpu_busy_ms": round(sum(b - a for a, b in _union(
        [iv for ivs in busy.values() for iv in ivs])) / 1e3, 1), "streams": {}}
    for s, es in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        names: dict[str, float] = {}
        for e in es:
            names[e["name"][:60]] = names.get(e["name"][:60], 0.0) + e["dur"] / 1e3
        top = sorted(names.items(), key=lambda kv: -kv[1])[:5]
        out["streams"][s] = {"events": len(es), "busy_ms": round(sum(b - a for a, b in busy[s]) / 1e3, 1),
                             "top": {k: round(v, 1) for k, v in top}}
    keys = list(busy)
    out["overlap_ms"] = {f"{a}&{b}": round(_overlap(busy[a], busy[b]) / 1e3, 1)
                         for i, a in enumerate(keys) for b in keys[i + 1:]}
    runtime: dict[str, dict[str, float]] = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            per = runtime.setdefault(str(e.get("tid")), {})
            per[e["name"]] = per.get(e["name"], 0.0) + e["dur"] / 1e3
    out["host_cuda_calls_ms"] = {t: {k: round(v, 1) for k, v in sorted(c.items(), key=lambda kv: -kv[1])[:6]}
                                 for t, c in runtime.items()}
    return out


def _probe_data(folder: Path, name: str, rows: int, spec: dict, gen) -> None:
    """``rows`` synthetic features (float16, ~4 MB chunks) and labels in ``folder/name.zarr``,
    drawn on the device as bench/probe.py draws them on the CPU."""
    import torch
    import zarr

    n_classes, d = spec["means"].shape
    root = zarr.open_group(folder / f"{name}.zarr", mode="w")
    chunk = max(1, (4 << 20) // (2 * d))
    Xz = root.create_array("features", shape=(rows, d), chunks=(chunk, d), dtype="float16", compressors=None,
                           dimension_names=("sample", "feature"))
    y = torch.randint(0, n_classes, (rows,), generator=gen, device=DEVICE)
    for start in range(0, rows, 32 * chunk):
        yb = y[start : start + 32 * chunk]
        Xb = torch.randn(len(yb), d, generator=gen, device=DEVICE) @ spec["noise"] + spec["means"][yb] + spec["offset"]
        Xz[start : start + len(yb)] = Xb.half().cpu().numpy()
    root.create_array("labels", data=y.cpu().numpy(), chunks=(rows,), compressors=None, dimension_names=("sample",))


def _probe_read(path: Path):
    """Features as one float32 tensor on the device (chunks of float16 read and converted there) and labels."""
    import torch
    import zarr

    root = zarr.open_group(path, mode="r")
    src = root["features"]
    X = torch.empty(src.shape, dtype=torch.float32, device=DEVICE)
    step = 32 * src.chunks[0]
    for start in range(0, src.shape[0], step):
        X[start : start + step] = torch.from_numpy(src[start : start + step]).to(DEVICE, non_blocking=True).float()
    return X, root["labels"][:]


def probe_sweep(rows: int, d: int, n_classes: int, folder: Path, test_rows: int = 50_000) -> dict:
    """ImageNet-size ``select_and_fit`` on the device: the timed part is the Zarr read and the sweep."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe import make_classes  # bench/probe.py: the same synthetic classes

    from backbench.probe.linear import select_and_fit

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs: the objective stays scikit-learn's
    spec = {k: torch.as_tensor(v, device=DEVICE) for k, v in make_classes(d, n_classes).items()}
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    t = time.perf_counter()
    _probe_data(folder, "train", rows, spec, gen)
    _probe_data(folder, "test", test_rows, spec, gen)
    written = time.perf_counter() - t
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    X, y = _probe_read(folder / "train.zarr")
    sync()
    read_s = time.perf_counter() - start
    probe, sweep = select_and_fit(X, y, seed=0, device=DEVICE)
    sync()
    total = time.perf_counter() - start
    X_test, y_test = _probe_read(folder / "test.zarr")
    return {"rows": rows, "d": d, "classes": n_classes, "data_written_s": round(written, 1), "read_s": round(read_s, 2),
            "sweep_s": round(sweep.seconds, 2), "final_fit_s": round(total - read_s - sweep.seconds, 2),
            "total_s": round(total, 2), "best_C": sweep.best_C, "n_iter": sweep.n_iter, "final_n_iter": probe.n_iter_,
            "val_accuracy": [round(a, 4) for a in sweep.val_accuracy],
            "test_accuracy": round(float(probe.score(X_test, y_test)), 4),
            "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20) if DEVICE == "cuda" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=80000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--model", default="timm:vit_base_patch16_224@random")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="extract with torch.compile (not eager); ratios to the compiled bare pass")
    p.add_argument("--trace", type=Path, help="keep the profiler's Chrome trace in this folder")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the three extractions against the bare CPU forward only (a smoke run)")
    p.add_argument("--quick", action="store_true",
                   help="only the bare forward and the device and mixed extractions (about a minute)")
    p.add_argument("--decodes", default="device,mixed,workers",
                   help="the extractions to time, comma-separated (workers runs on half the images)")
    p.add_argument("--copies", action="store_true", help="write each JPEG file (default: hard links to 64 scenes)")
    p.add_argument("--json", type=Path)
    p.add_argument("--probe", action="store_true", help="(c) only: the linear probe's ImageNet-size C sweep")
    p.add_argument("--probe-rows", type=int, default=1_281_167)
    p.add_argument("--probe-d", type=int, default=1024)
    p.add_argument("--probe-classes", type=int, default=1000)
    args = p.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    assert DEVICE == "cpu" or torch.cuda.is_available(), "no CUDA device: run this on a GPU machine (or --device cpu)"
    if args.probe:
        return _probe_main(args)
    from backbench.extract.backbones import load_backbone

    torch.backends.cuda.matmul.allow_tf32 = True
    cuda = DEVICE == "cuda"
    res: dict = {"bench": "gpu", "card": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
                 "batch_size": args.batch_size, "images": args.images, "cores": os.cpu_count(),
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    def report(key, value):
        res[key] = value
        print(f"{key:32s} {value}", flush=True)

    def compiled_bare() -> None:
        t = time.perf_counter()
        report("bare_compiled_images_per_s", round(bare(bb, args.batch_size, True), 1))
        report("compile_and_bare_s", round(time.perf_counter() - t, 1))  # compiling included

    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        bb = load_backbone(args.model)
        report("bare_images_per_s", round(bare(bb, args.batch_size, False), 1))
        t = time.perf_counter()
        root = photo_like_jpegs(args.images, folder, copies=args.copies)
        report("jpeg_files_written_s", round(time.perf_counter() - t, 1))
        if cuda and not args.quick:
            report("gpu_decode_only_images_per_s", round(decode_only(root, args.batch_size), 1))
            report("gpu_decode_resize_images_per_s", round(decode_resize_only(bb, root, args.batch_size), 1))
        if not args.quick:
            report("decode_and_forward", decode_and_forward(bb, root, args.batch_size))
            for drain in (True, False):  # with and without the guard against decode_jpeg's write hazard
                report(f"decode_and_forward_overlapped_drain_{int(drain)}",
                       decode_and_forward(bb, root, args.batch_size, overlapped=True, drain=drain, check=True))
        decodes = args.decodes.split(",") if not args.quick else [d for d in args.decodes.split(",") if d != "workers"]
        if args.compile:  # compiled extraction is compared with the compiled bare pass
            compiled_bare()
        tag, base = ("_compiled", res["bare_compiled_images_per_s"]) if args.compile else ("", res["bare_images_per_s"])
        for decode in decodes:
            n = args.images // 2 if decode == "workers" else None
            e2e = end_to_end(bb, root, folder, args.batch_size, decode, args.compile, n)
            report(f"extract_{decode}_decode{tag}", e2e)
            report(f"ratio_{decode}{tag}", round(e2e["wall_images_per_s"] / base, 3))
            report(f"ratio_{decode}{tag}_steady", round(e2e["steady_images_per_s"] / base, 3))
            if args.json:
                args.json.write_text(json.dumps(res, indent=2))
        if cuda and not args.quick:
            try:  # a machine without CUPTI still gets the other figures
                report("trace_device_decode", profile_device_decode(bb, root, folder, args.batch_size, args.trace))
            except Exception as exc:
                report("trace_device_decode", {"error": f"{type(exc).__name__}: {exc}"})
        if cuda and not args.no_compile and not args.quick and not args.compile:
            compiled_bare()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def _probe_main(args) -> None:
    import torch

    res = {"bench": "gpu-probe", "card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
           "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-probe-"))
    try:
        res.update(probe_sweep(args.probe_rows, args.probe_d, args.probe_classes, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res["target_60s"] = "met" if res["total_s"] < 60 else "MISSED"
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
