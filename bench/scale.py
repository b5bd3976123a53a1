"""Probe and kNN against cache size: in memory vs streamed (``--memory-limit 0``).

Synthetic caches (10 Gaussian classes, d=768, float16) of growing size; each measurement runs
in a fresh process so its peak resident memory (ru_maxrss) is its own. Targets: streamed peak
memory flat as the cache grows; streamed time within 2x of in-memory where both fit.

    python bench/scale.py [--rows 50000 200000] [--d 768] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

B = "synthetic:gauss"


def make_cache(path: str, n: int, d: int, n_eval: int = 2000, classes: int = 10) -> None:
    from backbench.store import Cache

    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (classes, d)).astype(np.float32) * 0.15
    cache = Cache(path)
    for split, rows in (("train", n), ("test", n_eval)):
        meta = {"backbone": B, "weights_sha256": "s" * 64, "preprocess": {"synthetic": True}, "feature_kind": "pooled",
                "dataset": "gauss", "split": split, "source": "synthetic", "dataset_fingerprint": f"{split}-{rows}",
                "classes": [str(c) for c in range(classes)], "dtype": "float16"}
        g = cache.create_group(B, "gauss", split, n=rows, dim=d, dtype="float16", attrs=meta)
        step = g.chunk_rows * 16
        for start in range(0, rows, step):
            m = min(step, rows - start)
            y = rng.integers(0, classes, m)
            X = (means[y] + rng.normal(0, 1, (m, d)).astype(np.float32)).astype(np.float16)
            g.write_rows(start // g.chunk_rows, X, y, [str(i) for i in range(start, start + m)])
        g.finalize()


def one(task: str, cache_path: str, limit: str) -> dict:
    """Run one task in this process; report seconds, peak RSS and the headline metric."""
    from backbench.probe.neighbour_tasks import run_knn
    from backbench.probe.tasks import run_probe
    from backbench.store import Cache

    cache = Cache(cache_path, mode="r+")
    start = time.perf_counter()
    if task == "probe":
        rec, _ = run_probe(cache, B, "gauss", "train", "test", Cs=[0.1], force=True, memory_limit=limit)
    else:
        rec = run_knn(cache, B, "gauss", "train", "test", ks=[20], force=True, memory_limit=limit)[0][0]
    metric = rec["metrics"]["top1"]
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "top1": round(float(metric), 4)}


BATTLE = {
    "backbones": ["timm:test_resnet@random", "timm:test_vit@random", "timm:test_efficientnet@random",
                  "timm:test_convnext@random"],
    "workers": 0,
    "datasets": {"digits": {"source": "digits", "splits": ["train", "test"], "limit": 400},
                 "textures": {"source": "textures", "splits": ["test"], "role": "ood", "limit": 100}},
    "tasks": {"probe": {}, "fewshot": {"shots": [1, 5], "seeds": 2}, "knn": {"k": [10, 20]},
              "ood": {"ood": ["textures:test"], "scores": ["knn", "mahalanobis", "vim"]}},
}


def battle_times(folder: Path) -> dict:
    """Wall time of a small battle (4 tiny backbones x digits, 4 tasks): serial, then on a local
    dask cluster of 1 and 2 worker processes, each into a fresh cache."""
    import dask
    from dask.distributed import Client, LocalCluster

    from backbench.battle.config import parse_config
    from backbench.battle.run import run_battle, run_battle_dask
    from backbench.store import Cache

    cfg, out = parse_config(BATTLE), {"cells": 0}
    start = time.perf_counter()
    summary = run_battle(cfg, Cache(str(folder / "serial.zarr")))
    out["serial_s"], out["cells"] = round(time.perf_counter() - start, 1), len(summary.results)
    for n in (1, 2):
        start = time.perf_counter()
        with dask.config.set({"distributed.worker.daemon": False}), \
                LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            summary = run_battle_dask(cfg, Cache(str(folder / f"dask{n}.zarr")), client)
        assert not summary.failed
        out[f"dask_{n}_workers_s"] = round(time.perf_counter() - start, 1)
    print(f"battle ({out['cells']} cells): serial {out['serial_s']} s, dask 1 worker {out['dask_1_workers_s']} s, "
          f"2 workers {out['dask_2_workers_s']} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--quick", action="store_true", help="10,000 and 40,000 rows")
    p.add_argument("--no-battle", action="store_true", help="skip the battle timing")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", nargs=3, metavar=("TASK", "CACHE", "LIMIT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    if args.quick:
        args.rows = [10_000, 40_000]
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows_out = []
    try:
        for n in args.rows:
            path = str(folder / f"c{n}.zarr")
            make_cache(path, n, args.d)
            for task in ("probe", "knn"):
                row = {"task": task, "rows": n, "d": args.d, "cache_mb": round(n * args.d * 2 / 2**20)}
                for mode, limit in (("memory", "1TB"), ("streamed", "0")):
                    res = subprocess.run([sys.executable, __file__, "--one", task, path, limit], check=True,
                                         capture_output=True, text=True)
                    row[mode] = json.loads(res.stdout.strip().splitlines()[-1])
                row["time_ratio"] = round(row["streamed"]["seconds"] / row["memory"]["seconds"], 2)
                rows_out.append(row)
                print(f"{task:5s} {n:>9,} rows  in memory {row['memory']['seconds']:7.2f} s "
                      f"{row['memory']['peak_rss_mb']:6d} MB   streamed {row['streamed']['seconds']:7.2f} s "
                      f"{row['streamed']['peak_rss_mb']:6d} MB   time x{row['time_ratio']}  "
                      f"top1 {row['memory']['top1']} / {row['streamed']['top1']}", flush=True)
            shutil.rmtree(path, ignore_errors=True)
        battle = None if args.no_battle else battle_times(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    figures = {}
    for r in rows_out:
        for mode in ("memory", "streamed"):
            figures[f"{r['task']}_{r['rows']}_{mode}_s"] = r[mode]["seconds"]
            figures[f"{r['task']}_{r['rows']}_{mode}_mem_mb"] = r[mode]["peak_rss_mb"]
        figures[f"{r['task']}_{r['rows']}_time_ratio"] = r["time_ratio"]
    out = {"bench": "scale", "figures": figures, "rows": rows_out, "battle": battle}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
