"""What a dense battle costs: cache size and probe time per 1,000 images, against the bare
forward pass of the same backbone.

On the built-in ``shapes`` set (masks and boxes), for one backbone:

* the bare forward pass: the model's ``forward_features`` on batches of preprocessed images
  (timm's own transform, the whole image resized), images/s — the floor any extraction pays;
* ``extract --features map``: wall time per 1,000 images, and the cache's bytes per image;
* ``segment`` (the default 3 x 2 lr x weight-decay grid, holdout selection, refit, 20 epochs) and
  ``detect`` (the default light pyramid, 20 epochs): wall time per 1,000 training images.

The figures scale to a VOC- (1,464 train / 1,449 val) or ADE20K-size (20,210 / 2,000) battle by
the per-1,000 rates (the map's size, h x w x d, sets the cache and the probe time: pass a
backbone like the one you will use). Usage::

    python bench/dense.py                                     # EfficientNet-Lite0 (offline weights)
    python bench/dense.py --backbone timm:vit_small_patch16_224@random --train 200 --test 100
    python bench/dense.py --quick                             # 60 / 30 images, 2 epochs: a smoke run
    python bench/dense.py --device cuda --train 200 --test 100 --json bench/results/dense-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare_forward(name: str, n: int, batch: int, device: str) -> float:
    """Images/s of the backbone's ``forward_features`` on ``n`` preprocessed shapes images."""
    import torch

    from backbench.extract.backbones import load_backbone
    from backbench.extract.datasets import open_source

    bb = load_backbone(name)
    model = bb.model.to(device).eval()
    src = open_source("shapes", "train")
    size = tuple(bb.preprocess.to_dict()["input_size"][1:])
    mean = torch.tensor(bb.preprocess.to_dict()["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(bb.preprocess.to_dict()["std"]).view(1, 3, 1, 1)
    import numpy as np

    imgs = torch.stack([torch.from_numpy(np.asarray(src.load(i % len(src)).resize(size[::-1]), dtype=np.float32))
                        .permute(2, 0, 1) / 255.0 for i in range(batch)])
    x = ((imgs - mean) / std).to(device)
    with torch.inference_mode():
        model.forward_features(x)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, done = time.perf_counter(), 0
        while done < n:
            model.forward_features(x)
            done += batch
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="timm:tf_efficientnet_lite0@local")
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.train, args.test = 60, 30
    epochs = {"segment": 2 if args.quick else 20, "detect": 2 if args.quick else 20}  # the tasks' defaults

    import backbench

    tmp = Path(tempfile.mkdtemp(prefix="bench-dense-"))
    cache = str(tmp / "dense.zarr")
    try:
        fwd = bare_forward(args.backbone, args.train, 16 if args.device == "cpu" else 128, args.device)
        start = time.perf_counter()
        for split, n in (("train", args.train), ("test", args.test)):
            backbench.extract(args.backbone, "shapes", dataset="shapes", split=split, cache=cache, features=["map"],
                              limit=n, device=args.device)
        extract_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
        from backbench.store import Cache

        shape = Cache(cache).group(args.backbone, "shapes", "train", "map").attrs["map_shape"]
        start = time.perf_counter()
        seg = backbench.segment(args.backbone, "shapes", train="train", eval="test", cache=cache,
                                epochs=epochs["segment"], device=args.device, force=True).metrics
        seg_s = time.perf_counter() - start
        start = time.perf_counter()
        det = backbench.detect(args.backbone, "shapes", train="train", eval="test", cache=cache,
                               epochs=epochs["detect"], device=args.device, force=True).metrics
        det_s = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    images = args.train + args.test
    out = {
        "backbone": args.backbone, "device": args.device, "machine": platform.processor() or platform.machine(),
        "train": args.train, "test": args.test, "map_shape": shape,
        "bare_forward_images_per_s": round(fwd, 2),
        "extract_images_per_s": round(images / extract_s, 2),
        "extract_efficiency": round(images / extract_s / fwd, 3),
        "cache_bytes_per_image": round(size / images),
        "cache_MB_per_1000_images": round(size / images * 1000 / 1e6, 1),
        "segment_s_per_1000_train": round(seg_s / args.train * 1000, 1), "segment_epochs": epochs["segment"],
        "segment_grid": 6, "segment_miou": round(seg["miou"], 4),
        "detect_s_per_1000_train": round(det_s / args.train * 1000, 1), "detect_epochs": epochs["detect"],
        "detect_ap": round(det["ap"], 4),
    }
    print(f"{args.backbone} on {args.device}, map {shape[0]}x{shape[1]}x{shape[2]}")
    print(f"  bare forward      {fwd:8.1f} img/s")
    print(f"  extract map       {out['extract_images_per_s']:8.1f} img/s   ({out['extract_efficiency']:.2f} of the "
          f"bare forward)   {out['cache_MB_per_1000_images']} MB per 1,000 images")
    print(f"  segment           {out['segment_s_per_1000_train']:8.1f} s per 1,000 train images "
          f"(6-point grid + refit, {epochs['segment']} epochs)   mIoU {seg['miou']:.3f}")
    print(f"  detect            {out['detect_s_per_1000_train']:8.1f} s per 1,000 train images "
          f"({epochs['detect']} epochs)   AP {det['ap']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
