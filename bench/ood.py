"""OOD scores: backbench's scorers against pytorch-ood's detectors on the same feature arrays.

Synthetic features: 10 Gaussian ID classes with a shared, rotated, anisotropic covariance;
OOD rows come from 10 other class centres (near-OOD: new classes, same noise). One
backbench ``LinearProbe`` is fitted on ID train (not timed) and is the linear head of both
sides: backbench's logit scorers and ViM take the probe, pytorch-ood gets the same head as
a float64 ``torch.nn.Linear`` (logit detectors) or as ``w, b`` (ViM). Each timing is fit on
ID train plus scoring ID test and OOD; the two sides run alternately ``--repeat`` times (two
more when under a second) and each keeps its best time, the least disturbed on a shared machine.
pytorch-ood gets whole tensors (its fastest path); backbench reads 4,096-row chunks.

Memory: the peak RSS above the baseline is measured around each run (Linux: the high-water
mark is reset through ``/proc/self/clear_refs``); an n x n matrix would show as gigabytes.

    python bench/ood.py                 # 50,000 train, 10,000 ID test, 10,000 OOD, 1,280 dims
    python bench/ood.py --quick         # 5,000 / 1,000 / 1,000: a smoke run
    python bench/ood.py --n 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_CLASSES = 10
CENTER_SCALE = 0.15  # class separation against the noise: near-OOD AUROCs well below 1
SPREAD_DECAY = 0.75  # per-direction scale (1 + j / 32) ** -decay, rotated: a decaying feature spectrum
REPEAT_UNDER_S = 1.0
M_MMAP_THRESHOLD = -3  # glibc mallopt: a fixed threshold keeps large blocks mmap'd, unmapped when freed


def make_features(n_train: int, n_eval: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 ID train / ID test / OOD features and int64 labels of the ID rows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((2 * N_CLASSES, dim)).astype(np.float32) * CENTER_SCALE
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    spread = ((1.0 + np.arange(dim) / 32.0) ** -SPREAD_DECAY).astype(np.float32)

    def draw(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, n)
        latent = centers[offset + y] + rng.standard_normal((n, dim), dtype=np.float32)
        return (latent * spread) @ rotation + 0.5, y

    X_train, y_train = draw(n_train, 0)
    X_test, y_test = draw(n_eval, 0)
    X_ood, _ = draw(n_eval, N_CLASSES)
    return {"X_train": X_train, "y_train": y_train, "X_test": X_test, "y_test": y_test, "X_ood": X_ood}


# --------------------------------------------------------------------------- measurement


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _reset_peak() -> bool:
    """Give freed heap memory back and restart the high-water mark of RSS (Linux, glibc)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def first_run(run: Callable[[], tuple[np.ndarray, np.ndarray]]) -> dict:
    """Seconds, extra peak RSS in MB (None where it cannot be read) and the scores of one run."""
    base = _status_kb("VmRSS:")
    tracked = _reset_peak() and base is not None
    start = time.perf_counter()
    scores = run()
    seconds = time.perf_counter() - start
    peak = (_status_kb("VmHWM:") - base) / 1024 if tracked else None
    return {"seconds": seconds, "peak_extra_mb": peak, "scores": scores}


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_pair(runs: dict[str, Callable], repeat: int) -> dict[str, dict]:
    """Alternate the sides ``repeat`` times (more when a run is under a second); keep each side's best time.

    The machine may be shared: the minimum over alternating runs is the least disturbed estimate.
    """
    out = {side: first_run(run) for side, run in runs.items()}
    extra = repeat - 1 + (2 if max(m["seconds"] for m in out.values()) < REPEAT_UNDER_S else 0)
    for _ in range(extra):
        for side, run in runs.items():
            out[side]["seconds"] = min(out[side]["seconds"], timed(run))
    for m in out.values():
        m["runs"] = extra + 1
    return out


# --------------------------------------------------------------------------- the two sides


def backbench_runs(data: dict, probe, k: int) -> dict[str, Callable]:
    from backbench.probe.ood import make_scorer

    params = {"msp": {"probe": probe}, "maxlogit": {"probe": probe}, "energy": {"probe": probe},
              "knn": {"k": k}, "vim": {"probe": probe}}

    def run(name: str) -> Callable:
        def go():
            scorer = make_scorer(name, **params.get(name, {})).fit(data["X_train"], data["y_train"])
            return scorer.score_samples(data["X_test"]), scorer.score_samples(data["X_ood"])
        return go

    from backbench.probe.ood import SCORES

    return {name: run(name) for name in SCORES}


def pytorch_ood_runs(data: dict, W: np.ndarray, b: np.ndarray, k: int, vim_dim: int) -> dict[str, Callable]:
    """pytorch-ood detectors, signs flipped (they return outlier scores)."""
    import torch
    from pytorch_ood import detector as det

    head = torch.nn.Linear(W.shape[1], W.shape[0]).double().requires_grad_(False)
    head.weight.copy_(torch.from_numpy(W))
    head.bias.copy_(torch.from_numpy(b))
    tensor = torch.from_numpy

    def logits(make) -> Callable:
        def go():
            d = make(head)
            return [-d.predict(tensor(data[s]).double()).numpy() for s in ("X_test", "X_ood")]
        return go

    def features(make) -> Callable:
        def go():
            d = make().fit_features(tensor(data["X_train"]), tensor(data["y_train"]))
            return [-d.predict_features(tensor(data[s])).double().numpy() for s in ("X_test", "X_ood")]
        return go

    return {
        "msp": logits(det.MaxSoftmax), "maxlogit": logits(det.MaxLogit), "energy": logits(det.EnergyBased),
        "mahalanobis": features(lambda: det.Mahalanobis(None)),
        "relative_mahalanobis": features(lambda: det.RMD(None)),
        "knn": features(lambda: det.KNN(None, k=k)),
        "vim": features(lambda: det.ViM(None, d=vim_dim, w=tensor(W).float(), b=tensor(b).float())),
    }


# --------------------------------------------------------------------------- main


def compare(data: dict, probe, k: int, repeat: int, only: list[str] | None = None) -> dict[str, dict]:
    from backbench.probe.ood import default_vim_dim, linear_head
    from backbench.probe.ood_metrics import ood_metrics

    W, b = linear_head(probe)
    ours = backbench_runs(data, probe, k)
    ref = pytorch_ood_runs(data, W, b, k, default_vim_dim(W.shape[1]))
    results = {}
    for name, run in ours.items():
        if only and name not in only:
            continue
        sides = {"backbench": run, "pytorch_ood": ref[name]} if name in ref else {"backbench": run}
        row = {}
        for side, m in measure_pair(sides, repeat).items():
            row[side] = {"seconds": m["seconds"], "runs": m["runs"], "peak_extra_mb": m["peak_extra_mb"],
                         **ood_metrics(*m["scores"])}
        if "pytorch_ood" in row:
            row["speedup"] = row["pytorch_ood"]["seconds"] / row["backbench"]["seconds"]
            row["auroc_diff"] = abs(row["pytorch_ood"]["auroc"] - row["backbench"]["auroc"])
        results[name] = row
        print(_line(name, row), flush=True)
    return results


def _line(name: str, row: dict) -> str:
    bb, ref = row["backbench"], row.get("pytorch_ood")
    mem = lambda r: "   n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:6.0f}"  # noqa: E731
    left = f"  {name:<21}{bb['seconds']:8.3f} s {mem(bb)} MB  AUROC {bb['auroc']:.4f}"
    if ref is None:
        return left + "   | pytorch-ood has no such detector"
    return (left + f"   | {ref['seconds']:8.3f} s {mem(ref)} MB  AUROC {ref['auroc']:.4f}"
            f"   | {row['speedup']:6.2f}x  dAUROC {row['auroc_diff']:.1e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="ID train rows (ID test and OOD rows: n / 5 each)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--k", type=int, default=50, help="kNN neighbours (Sun et al.: 50 on CIFAR-10)")
    parser.add_argument("--C", type=float, default=1.0, help="inverse regularization of the shared linear probe")
    parser.add_argument("--quick", action="store_true", help="5,000 train rows: a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side, alternating; best kept")
    parser.add_argument("--only", nargs="+", metavar="SCORE", help="run only these scores (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def env_info() -> dict:
    import pytorch_ood
    import sklearn
    import torch

    from backbench.probe.knn import import_faiss

    return {"cpus": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "pytorch_ood": pytorch_ood.__version__, "torch": torch.__version__, "faiss": import_faiss().__version__,
            "sklearn": sklearn.__version__, "numpy": np.__version__}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    n_train = 5_000 if args.quick else args.n
    n_eval = max(1, n_train // 5)
    if _LIBC is not None:  # else glibc raises its threshold after each free and keeps blocks: peaks would hide
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 17)
    from backbench.probe.knn import import_faiss
    from backbench.probe.linear import LinearProbe

    import_faiss()  # before torch's first BLAS call, as backbench users get it
    data = make_features(n_train, n_eval, args.dim)
    start = time.perf_counter()
    probe = LinearProbe(C=args.C).fit(data["X_train"], data["y_train"])
    probe_s = time.perf_counter() - start
    data_mb = sum(a.nbytes for a in data.values()) / 2**20
    print(f"OOD scores: {n_train:,} ID train, {n_eval:,} ID test, {n_eval:,} OOD x {args.dim} dims, {N_CLASSES} "
          f"classes; data {data_mb:.0f} MB; shared probe (C={args.C}) fitted in {probe_s:.1f} s, not timed; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"  {'score':<21}{'backbench (fit+score, peak extra RSS)':<45}| {'pytorch-ood':<42}| speedup")
    results = compare(data, probe, args.k, args.repeat, args.only)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slower = [n for n, r in results.items() if r.get("speedup", np.inf) < 1]
    worst = max((r["auroc_diff"] for r in results.values() if "auroc_diff" in r), default=0.0)
    print(f"  peak RSS of the process {peak_mb:.0f} MB (data {data_mb:.0f} MB; one ID-test x train float32 "
          f"matrix alone would be {n_eval * n_train * 4 / 2**20:.0f} MB)")
    print(f"  max |AUROC difference| {worst:.1e}; slower than pytorch-ood: {', '.join(slower) or 'none'}")
    out = {"n_train": n_train, "n_eval": n_eval, "dim": args.dim, "k": args.k, "n_classes": N_CLASSES,
           "probe_C": args.C, "repeat": args.repeat, "scores": results, "peak_rss_mb": round(peak_mb, 1),
           "data_mb": round(data_mb, 1), "max_auroc_diff": worst, "slower": slower, "env": env_info()}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
