"""GPU throughput of ViT-B/16 (random init): bare forward vs end-to-end extraction.

(a) the bare forward pass on uint8 tensors already on the device, bf16 autocast,
    channels-last (eager, and with ``torch.compile``); (b) ``backbench extract`` from JPEG
    files into a cache, JPEGs decoded on the GPU (``--decode device``), and for comparison
    decoded by PIL in the DataLoader workers. Targets on an H100/H200: (a) >= 8,000 images/s,
    (b) >= 0.8 of (a).

    python bench/gpu.py [--images 80000] [--batch-size 512] [--json out.json] [--no-compile]
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


def bare(backbone, batch_size: int, compile: bool, steps: int = 40) -> float:
    """Images/s of the same step extraction runs (normalize, channels-last, bf16, forward)."""
    import torch

    from backbench.extract.run import forward_step

    backbone.model.to("cuda", memory_format=torch.channels_last)
    step = forward_step(backbone, "cuda", compile)
    c, h, w = backbone.preprocess.input_size
    x = torch.randint(0, 256, (batch_size, c, h, w), dtype=torch.uint8, device="cuda")
    with torch.inference_mode():
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                start = time.perf_counter()
            feats, _ = step(x)
        torch.cuda.synchronize()
    backbone.model.to("cpu")
    return steps * batch_size / (time.perf_counter() - start)


def photo_like_jpegs(n: int, folder: Path, size: tuple[int, int] = (500, 375)) -> Path:
    """n JPEG files of ImageNet's typical size (500x375, quality 90): 32 smooth random scenes."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    w, h = size
    blobs = []
    for _ in range(32):
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.DETAIL)
        noise = rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        d = folder / "images" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(blobs[i % len(blobs)])
    return folder / "images"


def decode_only(root: Path, batch_size: int) -> float:
    """Images/s of torchvision's batched decode_jpeg on the GPU alone (bytes already in memory)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted(root.rglob("*.jpg"))[: batch_size * 10]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    decode_jpeg(data[:batch_size], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(data), batch_size):
        decode_jpeg(data[i : i + batch_size], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def decode_and_forward(bb, root: Path, batch_size: int) -> float:
    """Images/s of GPU decode + resize + forward over JPEG bytes already in memory (no loader)."""
    import torch

    from backbench.extract.decode import DeviceDecoder
    from backbench.extract.run import forward_step

    files = sorted(root.rglob("*.jpg"))[: batch_size * 12]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    bb.model.to("cuda", memory_format=torch.channels_last)
    decoder, step = DeviceDecoder(bb.preprocess, "cuda", None), forward_step(bb, "cuda")
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            if i == 2 * batch_size:
                torch.cuda.synchronize()
                start = time.perf_counter()
            x, _ = decoder(list(range(batch_size)), data[i : i + batch_size])
            step(x)
        torch.cuda.synchronize()
    bb.model.to("cpu")
    return (len(data) - 2 * batch_size) / (time.perf_counter() - start)


def end_to_end(bb, root: Path, folder: Path, batch_size: int, decode: str, compile: bool, limit: int | None) -> dict:
    from backbench.extract.run import extract

    cache = folder / f"c-{decode}-{int(compile)}.zarr"
    start = time.perf_counter()
    res = extract(bb, f"imagefolder:{root}", cache=str(cache), dataset="gpu", split="bench", batch_size=batch_size,
                  device="cuda", workers=os.cpu_count(), decode=decode, compile=compile, limit=limit)
    wall = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    return {"images": res.rows_written, "wall_images_per_s": round(res.rows_written / wall, 1),
            "loop_images_per_s": round(res.images_per_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=80000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--model", default="timm:vit_base_patch16_224@random")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import torch

    from backbench.extract.backbones import load_backbone

    assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
    torch.backends.cuda.matmul.allow_tf32 = True
    res: dict = {"bench": "gpu", "card": torch.cuda.get_device_name(), "model": args.model,
                 "batch_size": args.batch_size, "images": args.images, "cores": os.cpu_count(),
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    def report(key, value):
        res[key] = value
        print(f"{key:28s} {value}", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        bb = load_backbone(args.model)
        report("bare_images_per_s", round(bare(bb, args.batch_size, False), 1))
        t = time.perf_counter()
        root = photo_like_jpegs(args.images, folder)
        report("jpeg_files_written_s", round(time.perf_counter() - t, 1))
        report("gpu_decode_only_images_per_s", round(decode_only(root, args.batch_size), 1))
        report("decode_and_forward_images_per_s", round(decode_and_forward(bb, root, args.batch_size), 1))
        report("extract_device_decode", end_to_end(bb, root, folder, args.batch_size, "device", False, None))
        report("extract_worker_decode", end_to_end(bb, root, folder, args.batch_size, "workers", False,
                                                   args.images // 10))
        res["ratio_device_decode"] = round(res["extract_device_decode"]["wall_images_per_s"]
                                           / res["bare_images_per_s"], 3)
        report("ratio_device_decode", res["ratio_device_decode"])
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        if not args.no_compile:
            t = time.perf_counter()
            report("bare_compiled_images_per_s", round(bare(bb, args.batch_size, True), 1))
            report("compile_and_bare_s", round(time.perf_counter() - t, 1))
            if res["compile_and_bare_s"] < 120:  # a second compile inside extract costs as much again
                report("extract_device_decode_compiled", end_to_end(bb, root, folder, args.batch_size, "device",
                                                                    True, None))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
