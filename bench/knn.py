"""kNN classification: backbench's KNNClassifier against scikit-learn's brute-force cosine kNN.

Synthetic features (10 Gaussian class clusters) are stored as float16 in Zarr v3 arrays in a
temporary folder, as a feature cache would hold them; reading them is part of every timed
path. scikit-learn gets its fastest input (float32; float16 would be upcast to float64).
Agreement compares scikit-learn's majority vote with backbench's ``weights="uniform"`` vote
on the same fitted index; the timed backbench runs use the default DINO-weighted vote.

Three contenders are timed: backbench's default search (on CPU ``search="fast"``: int8
candidates, exact float32 re-ranking), its ``search="exact"`` faiss search, and scikit-learn,
each ``--repeat`` times in turn; the fastest run of each counts (all are in the JSON), so the
first run's one-off costs (fresh memory pages for the arrays, lazy imports) weigh on none.
The fast path's predictions and neighbour lists are compared with the exact path's.

Exact search is one 1.28 TFLOP float32 matrix product at full size, so the BLAS kernels
decide much: faiss-cpu bundles an old OpenBLAS that backbench points at the CPU's AVX-512 /
AVX2 kernels, unless ``OPENBLAS_CORETYPE`` is set, which then applies to numpy's and faiss's
OpenBLAS alike (the JSON records it, and the CPU seconds of each side).

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


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of one call."""
    cpu, start = cpu_seconds(), time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, cpu_seconds() - cpu, out


def run_backbench(root: Path, k: int, search: str = "auto"):
    """Fit and predict, reading features chunk by chunk from Zarr; returns (model, preds)."""
    from backbench.probe.knn import KNNClassifier

    train_X, train_y = open_split(root, "train")
    eval_X, _ = open_split(root, "eval")
    clf = KNNClassifier(k=k, search=search).fit(train_X, train_y)
    return clf, clf.predict(eval_X)


def compare_neighbours(fast, exact, eval_X) -> dict:
    """Shares of eval rows whose neighbour lists agree between two fitted classifiers.

    ``missed``: rows where ``fast`` lost a true neighbour, i.e. some rank's similarity is lower
    by more than float32 summation noise; sets that differ otherwise differ by near-ties.
    """
    (fs, fi), (es, ei) = fast.kneighbors(eval_X), exact.kneighbors(eval_X)
    return {"same_set": float(np.mean((np.sort(fi, axis=1) == np.sort(ei, axis=1)).all(axis=1))),
            "same_order": float(np.mean((fi == ei).all(axis=1))),
            "missed": float(np.mean((fs < es - 1e-5).any(axis=1))),
            "max_sim_diff": float(np.abs(fs - es).max())}


def run_sklearn(root: Path, k: int):
    """Read the arrays whole, cast to float32, fit and predict; returns (None, preds)."""
    from sklearn.neighbors import KNeighborsClassifier

    train_X, train_y = open_split(root, "train")
    eval_X, _ = open_split(root, "eval")
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine")
    clf.fit(np.asarray(train_X[:], dtype=np.float32), train_y)
    return None, clf.predict(np.asarray(eval_X[:], dtype=np.float32))


def timed_runs(root: Path, k: int, repeat: int) -> dict:
    """Each contender run ``repeat`` times, interleaved; name -> {"s", "cpu_s"} lists, model, preds."""
    contenders = {"backbench": (run_backbench, {}), "exact": (run_backbench, {"search": "exact"}),
                  "sklearn": (run_sklearn, {})}
    out = {name: {"s": [], "cpu_s": []} for name in contenders}
    for _ in range(repeat):
        for name, (fn, kwargs) in contenders.items():
            wall, cpu, (model, pred) = timed(fn, root, k, **kwargs)
            out[name]["s"].append(round(wall, 3))
            out[name]["cpu_s"].append(round(cpu, 2))
            out[name].update(model=model, pred=pred)
    return out


def print_report(r: dict) -> None:
    """The human-readable summary of one ``main`` result."""
    acc, vs, redone = r["accuracy"], r["vs_exact"], r["vs_exact"]["queries_researched_exactly"]
    print(f"kNN k={r['k']}: {r['n_train']:,} train x {r['n_eval']:,} eval x {r['dim']} dims, float16 Zarr, "
          f"{r['n_classes']} classes, OPENBLAS_CORETYPE={r['env']['OPENBLAS_CORETYPE']}, "
          f"best of {r['repeat']} runs, load {r['env']['loadavg_1m_after']}")
    dino = f"accuracy {acc['backbench_dino']:.4f} (DINO vote; {r['search']})"
    rows = (("backbench KNNClassifier", "backbench", dino),
            (" ... search='exact'", "exact", ""), ("sklearn KNeighbors", "sklearn", f"accuracy {acc['sklearn']:.4f}"))
    for label, name, note in rows:
        runs = ", ".join(f"{t:.2f}" for t in r["runs"][name]["s"])
        print(f"  {label:24s} {r[name + '_s']:7.2f} s ({r[name + '_cpu_s']:5.1f} CPU s; runs {runs})   {note}")
    print(f"  speedup {r['speedup']:.2f}x (search='exact': {r['speedup_exact']:.2f}x; run by run: "
          f"{', '.join(f'{x:.2f}x' for x in r['speedup_per_run'])})   "
          f"majority-vote agreement with sklearn {r['agreement']:.4%}")
    print(f"  default vs exact search: predictions {vs['predictions']:.4%}, neighbour sets {vs['same_set']:.4%}, "
          f"order {vs['same_order']:.4%}, missed {vs['missed']:.4%}, max |sim diff| {vs['max_sim_diff']:.1e}"
          + (f", re-searched exactly {redone:,} / {vs['queries']:,}" if redone is not None else ""))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="train rows (eval rows: n / 5)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5,000 train rows: a smoke run")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each contender; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    n_train = 5_000 if args.quick else args.n
    n_eval = max(1, n_train // 5)
    import sklearn

    from backbench.probe.knn import import_faiss

    faiss = import_faiss()  # library imports stay outside the timed runs (torch: the fast search)
    import torch  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="backbench-knn-") as tmp:
        root = Path(tmp)
        make_features(root, n_train, n_eval, args.dim)
        eval_X, eval_y = open_split(root, "eval")
        runs = timed_runs(root, args.k, args.repeat)
        clf, exact = runs["backbench"]["model"], runs["exact"]["model"]
        bb_pred, ex_pred, sk_pred = (runs[name]["pred"] for name in ("backbench", "exact", "sklearn"))
        index = clf.index_
        redone = (index.n_redone, index.n_queries) if hasattr(index, "n_redone") else None
        neighbours = compare_neighbours(clf, exact, eval_X)
        majority = clf.set_params(weights="uniform").predict(eval_X)
    best = {name: min(r["s"]) for name, r in runs.items()}  # timeit's rule: the least disturbed run
    cpu = {name: r["cpu_s"][r["s"].index(best[name])] for name, r in runs.items()}
    bb_s, ex_s, sk_s = best["backbench"], best["exact"], best["sklearn"]
    result = {
        "n_train": n_train, "n_eval": n_eval, "dim": args.dim, "k": args.k, "n_classes": N_CLASSES,
        "search": type(index).__name__, "repeat": args.repeat, "backbench_s": bb_s, "exact_s": ex_s,
        "sklearn_s": sk_s, "speedup": round(sk_s / bb_s, 2), "speedup_exact": round(sk_s / ex_s, 2),
        "fast_vs_exact": round(ex_s / bb_s, 2),
        "speedup_per_run": [round(sk / bb, 2) for sk, bb in zip(runs["sklearn"]["s"], runs["backbench"]["s"])],
        "backbench_cpu_s": cpu["backbench"], "exact_cpu_s": cpu["exact"], "sklearn_cpu_s": cpu["sklearn"],
        "runs": {name: {"s": r["s"], "cpu_s": r["cpu_s"]} for name, r in runs.items()},
        "agreement": float(np.mean(majority == sk_pred)),
        "vs_exact": {"predictions": float(np.mean(bb_pred == ex_pred)), **neighbours,
                     "queries_researched_exactly": redone and redone[0], "queries": redone and redone[1]},
        "accuracy": {"backbench_dino": float(np.mean(bb_pred == eval_y)),
                     "backbench_majority": float(np.mean(majority == eval_y)),
                     "sklearn": float(np.mean(sk_pred == eval_y))},
        "env": {"cpus": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2),
                "cpu": platform.processor() or platform.machine(),
                "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "faiss": faiss.__version__,
                "sklearn": sklearn.__version__, "numpy": np.__version__},
    }
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
