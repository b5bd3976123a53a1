"""Extraction efficiency and cache I/O, each against what a user would write instead.

1. Efficiency: end-to-end ``backbench extract`` images/s on JPEG files (decode, resize, crop,
   forward, Zarr writes) divided by a bare loop of the same model's forward pass over
   already-decoded, already-resized uint8 tensors of the same batch size. Target >= 0.85.
2. Cache I/O: reading (and writing) an n x d float16 feature matrix through the cache
   against ``numpy.load`` / ``numpy.save`` of the same matrix as ``.npy``. Target >= 0.5.

    python bench/extract.py [--images 512] [--backbone timm:tf_efficientnet_lite0@local] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train.tar.gz"


def unpack_subset(n: int, folder: Path) -> Path:
    """The first n/10 JPEGs of each CIFAR-10 class, as an image folder (or generated JPEGs)."""
    root = folder / "images"
    per_class = max(1, n // 10)
    if CIFAR.exists():
        counts: dict[str, int] = {}
        with tarfile.open(CIFAR) as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) < 4:
                    continue
                cls = parts[-2]
                if counts.get(cls, 0) < per_class:
                    counts[cls] = counts.get(cls, 0) + 1
                    target = root / cls / parts[-1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
                if len(counts) == 10 and all(v >= per_class for v in counts.values()):
                    break
    else:  # no shared data: generated 32x32 JPEGs of the same size
        from PIL import Image

        rng = np.random.default_rng(0)
        for c in range(10):
            for i in range(per_class):
                (root / f"c{c}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def bare_forward(backbone, source, batch_size: int) -> float:
    """Images/s of the forward pass alone over pre-decoded, pre-resized uint8 tensors."""
    import torch

    tf = backbone.preprocess.to_uint8()
    x = torch.stack([tf(source.load(i)) for i in range(len(source))])
    with torch.inference_mode():
        backbone.forward(backbone.preprocess.normalize(x[:batch_size]))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            feats, _ = backbone.forward(backbone.preprocess.normalize(x[i : i + batch_size]))
            feats.float().numpy()
    return len(x) / (time.perf_counter() - start)


def end_to_end(backbone, source, batch_size: int, cache: Path, workers: int | None) -> float:
    from backbench.extract.run import extract

    start = time.perf_counter()
    res = extract(backbone, source, cache=str(cache), dataset="cifar10", split="bench", batch_size=batch_size,
                  workers=workers)
    assert res.rows_written == len(source)
    return len(source) / (time.perf_counter() - start)


def cache_io(n: int, d: int, folder: Path, repeats: int = 3) -> dict[str, float]:
    """Seconds (best of ``repeats``, page cache flushed before each) to write and read an
    n x d float16 matrix with its labels and ids: the cache vs ``.npy`` files of the same arrays."""
    from backbench.store import Cache

    X = np.random.default_rng(0).normal(size=(n, d)).astype(np.float16)
    y = np.arange(n, dtype=np.int64) % 10
    ids = [f"train/{i % 10}/{i:07d}.jpg" for i in range(n)]
    best = {k: np.inf for k in ("npy_write_s", "cache_write_s", "cache_write_rows_s", "npy_read_s", "cache_read_s")}

    def keep(key: str, seconds: float) -> None:
        best[key] = min(best[key], seconds)

    for r in range(repeats):
        for p in (folder / "x.npy", folder / "y.npy", folder / "ids.npy"):
            p.unlink(missing_ok=True)
        shutil.rmtree(folder / "io.zarr", ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        np.save(folder / "x.npy", X)
        np.save(folder / "y.npy", y)
        np.save(folder / "ids.npy", np.asarray(ids))
        keep("npy_write_s", time.perf_counter() - start)
        os.sync()
        start = time.perf_counter()
        g = Cache(str(folder / "io.zarr")).create_group("bench:x", "io", "train", n=n, dim=d,
                                                       attrs={"backbone": "bench:x", "classes": []})
        rows = time.perf_counter()
        g.write_rows(0, X, y, ids)
        keep("cache_write_rows_s", time.perf_counter() - rows)
        g.finalize()
        keep("cache_write_s", time.perf_counter() - start)
        os.sync()
    for _ in range(repeats):
        start = time.perf_counter()
        a = np.load(folder / "x.npy")
        keep("npy_read_s", time.perf_counter() - start)
        start = time.perf_counter()
        b = Cache(str(folder / "io.zarr"), mode="r").group("bench:x", "io", "train").features()
        keep("cache_read_s", time.perf_counter() - start)
        assert np.array_equal(a, b)
    out = dict(best)
    out["read_ratio"] = out["npy_read_s"] / out["cache_read_s"]
    out["write_ratio"] = out["npy_write_s"] / out["cache_write_s"]
    out["write_rows_ratio"] = out["npy_write_s"] / out["cache_write_rows_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--backbone", default="timm:tf_efficientnet_lite0@local")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--n", type=int, default=50_000, help="rows for the cache I/O test")
    p.add_argument("--d", type=int, default=1280)
    p.add_argument("--quick", action="store_true", help="128 images, 5,000 rows")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.images, args.n = 128, 5000
    from backbench.extract.backbones import load_backbone
    from backbench.extract.datasets import ImageFolder

    folder = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        source = ImageFolder(unpack_subset(args.images, folder))
        backbone = load_backbone(args.backbone)
        bare = bare_forward(backbone, source, args.batch_size)
        e2e = end_to_end(backbone, source, args.batch_size, folder / "e2e.zarr", args.workers)
        io = cache_io(args.n, args.d, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res = {"bench": "extract", "backbone": args.backbone, "images": len(source), "batch_size": args.batch_size,
           "bare_images_per_s": round(bare, 2), "extract_images_per_s": round(e2e, 2),
           "efficiency": round(e2e / bare, 3), "io_n": args.n, "io_d": args.d,
           **{k: round(v, 4) for k, v in io.items()}, "cores": os.cpu_count()}
    print(f"bare forward   {bare:8.1f} img/s   ({args.backbone}, batch {args.batch_size}, {len(source)} JPEGs)")
    print(f"backbench      {e2e:8.1f} img/s   efficiency {e2e / bare:.3f} (target >= 0.85)")
    print(f"cache read     {io['cache_read_s']:.3f} s vs .npy {io['npy_read_s']:.3f} s: {io['read_ratio']:.2f}x "
          f"of .npy speed (target >= 0.5)")
    print(f"cache write    {io['cache_write_s']:.3f} s vs .npy {io['npy_write_s']:.3f} s: {io['write_ratio']:.2f}x "
          f"of .npy speed (target >= 0.5; features, labels and ids both ways, the cache's group creation "
          f"included; rows alone {io['cache_write_rows_s']:.3f} s: {io['write_rows_ratio']:.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
