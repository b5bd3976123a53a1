"""kNN classification: backbench's KNNClassifier against scikit-learn's brute-force cosine kNN.

Synthetic features (10 Gaussian class clusters) are stored as float16 in Zarr v3 arrays in a
temporary folder, as a feature cache would hold them; reading them is part of both timed
paths. scikit-learn gets its fastest input (float32; float16 would be upcast to float64).
Agreement compares scikit-learn's majority vote with backbench's ``weights="uniform"`` vote
on the same fitted index; the timed backbench run uses its default DINO-weighted vote.

Both sides are bound by one 1.28 TFLOP float32 matrix product at full size, so the BLAS
kernels decide much: faiss-cpu bundles an old OpenBLAS that backbench points at the CPU's
AVX-512 / AVX2 kernels, unless ``OPENBLAS_CORETYPE`` is set, which then applies to numpy's
and faiss's OpenBLAS alike (the JSON records it, and the CPU seconds of each side).

    python bench/knn.py                 # 50,000 train x 10,000 eval x 1,280 dims, k=20
    python bench/knn.py --quick         # 5,000 x 1,000, a smoke run
    python bench/knn.py --n 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_CLASSES = 10
CENTER_SCALE = 0.11  # class separation against unit noise, chosen so accuracy is not ~100%
CHUNK_ROWS = 2048


def make_features(root: Path, n_train: int, n_eval: int, dim: int, seed: int = 0) -> None:
    """Write train/eval float16 features and int64 labels as plain Zarr v3 arrays under ``root``."""
    import zarr

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_CLASSES, dim)).astype(np.float32) * CENTER_SCALE
    for split, n in (("train", n_train), ("eval", n_eval)):
        labels = rng.integers(0, N_CLASSES, n)
        feats = zarr.create_array(store=str(root / f"{split}_features.zarr"), shape=(n, dim), dtype="float16",
                                  chunks=(CHUNK_ROWS, dim), compressors=None)
        for start in range(0, n, CHUNK_ROWS):
            y = labels[start:start + CHUNK_ROWS]
            noise = rng.standard_normal((len(y), dim), dtype=np.float32)
            feats[start:start + len(y)] = (centers[y] + noise + 0.5).astype(np.float16)
        zarr.create_array(store=str(root / f"{split}_labels.zarr"), data=labels, chunks=(65536,))


def open_split(root: Path, split: str):
    """The (features, labels) Zarr arrays of ``split``, opened read-only."""
    import zarr

    return (zarr.open_array(str(root / f"{split}_features.zarr"), mode="r"),
            zarr.open_array(str(root / f"{split}_labels.zarr"), mode="r")[:])


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (tells whether it got both cores)."""
    t = os.times()
    return t.user + t.system


def run_backbench(root: Path, k: int):
    """Fit and predict, reading features chunk by chunk from Zarr; returns (seconds, model, preds)."""
    from backbench.probe.knn import KNNClassifier

    start = time.perf_counter()
    train_X, train_y = open_split(root, "train")
    eval_X, _ = open_split(root, "eval")
    clf = KNNClassifier(k=k).fit(train_X, train_y)
    pred = clf.predict(eval_X)
    return time.perf_counter() - start, clf, pred


def run_sklearn(root: Path, k: int):
    """Read the arrays whole, cast to float32, fit and predict; returns (seconds, preds)."""
    from sklearn.neighbors import KNeighborsClassifier

    start = time.perf_counter()
    train_X, train_y = open_split(root, "train")
    eval_X, _ = open_split(root, "eval")
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine")
    pred = clf.fit(np.asarray(train_X[:], dtype=np.float32), train_y).predict(np.asarray(eval_X[:], dtype=np.float32))
    return time.perf_counter() - start, pred


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="train rows (eval rows: n / 5)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5,000 train rows: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    n_train = 5_000 if args.quick else args.n
    n_eval = max(1, n_train // 5)
    import sklearn

    from backbench.probe.knn import import_faiss

    faiss = import_faiss()

    with tempfile.TemporaryDirectory(prefix="backbench-knn-") as tmp:
        root = Path(tmp)
        make_features(root, n_train, n_eval, args.dim)
        eval_y = open_split(root, "eval")[1]
        cpu0 = cpu_seconds()
        bb_s, clf, bb_pred = run_backbench(root, args.k)
        cpu1 = cpu_seconds()
        sk_s, sk_pred = run_sklearn(root, args.k)
        cpu2 = cpu_seconds()
        majority = clf.set_params(weights="uniform").predict(open_split(root, "eval")[0])
    result = {
        "n_train": n_train, "n_eval": n_eval, "dim": args.dim, "k": args.k, "n_classes": N_CLASSES,
        "backbench_s": round(bb_s, 3), "sklearn_s": round(sk_s, 3), "speedup": round(sk_s / bb_s, 2),
        "backbench_cpu_s": round(cpu1 - cpu0, 2), "sklearn_cpu_s": round(cpu2 - cpu1, 2),
        "agreement": float(np.mean(majority == sk_pred)),
        "accuracy": {"backbench_dino": float(np.mean(bb_pred == eval_y)),
                     "backbench_majority": float(np.mean(majority == eval_y)),
                     "sklearn": float(np.mean(sk_pred == eval_y))},
        "env": {"cpus": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2), "cpu": platform.processor() or platform.machine(),
                "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "faiss": faiss.__version__,
                "sklearn": sklearn.__version__, "numpy": np.__version__},
    }
    print(f"kNN k={args.k}: {n_train:,} train x {n_eval:,} eval x {args.dim} dims, float16 Zarr, "
          f"{N_CLASSES} classes")
    print(f"  backbench KNNClassifier  {bb_s:8.2f} s ({cpu1 - cpu0:5.1f} CPU s)   accuracy {result['accuracy']['backbench_dino']:.4f} (DINO vote)")
    print(f"  sklearn KNeighbors       {sk_s:8.2f} s ({cpu2 - cpu1:5.1f} CPU s)   accuracy {result['accuracy']['sklearn']:.4f}")
    print(f"  speedup {result['speedup']:.2f}x   majority-vote agreement {result['agreement']:.4%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
