"""GPU throughput of ViT-B/16 (random init): bare forward vs end-to-end extraction.

(a) the bare forward pass on uint8 tensors already on the device, bf16 autocast,
    channels-last; (b) ``backbench extract`` from JPEG files into a cache. Targets on an
    H100/H200: (a) >= 8,000 images/s, (b) >= 0.8 of (a).

    python bench/gpu.py [--images 20000] [--batch-size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def bare(backbone, batch_size: int, steps: int = 30) -> float:
    import torch

    model = backbone.model.to("cuda", memory_format=torch.channels_last)
    c, h, w = backbone.preprocess.input_size
    x = torch.randint(0, 256, (batch_size, c, h, w), dtype=torch.uint8, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                start = time.perf_counter()
            backbone.forward(backbone.preprocess.normalize(x).contiguous(memory_format=torch.channels_last))
        torch.cuda.synchronize()
    model.to("cpu")
    return steps * batch_size / (time.perf_counter() - start)


def jpegs(n: int, folder: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(16)]
    for i in range(n):
        d = folder / "images" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        base[i % 16].save(d / f"{i}.jpg", quality=90)
    return folder / "images"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--model", default="timm:vit_base_patch16_224@random")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import torch

    from backbench.extract.backbones import load_backbone
    from backbench.extract.run import extract

    assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        bb = load_backbone(args.model)
        a = bare(bb, args.batch_size)
        root = jpegs(args.images, folder)
        start = time.perf_counter()
        extract(bb, f"imagefolder:{root}", cache=str(folder / "c.zarr"), dataset="gpu", split="bench",
                batch_size=args.batch_size, device="cuda", workers=os.cpu_count())
        b = args.images / (time.perf_counter() - start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res = {"bench": "gpu", "card": torch.cuda.get_device_name(), "model": args.model, "batch_size": args.batch_size,
           "bare_images_per_s": round(a, 1), "extract_images_per_s": round(b, 1), "ratio": round(b / a, 3),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
