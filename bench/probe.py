"""Linear-probe benchmark: backbench's C sweep against a scikit-learn loop over the same grid.

Synthetic features of a realistic shape (n=50,000 train + 10,000 test at d=1,280 for 10 and
100 classes; n=100,000 + 20,000 at d=768 for 1,000 classes) are written as float16 into a
Zarr v3 array (uncompressed, ~4 MB row chunks) and into a .npy file. Each side runs in its
own process, so peak memory is its own:

* backbench: read the Zarr array (timed), ``select_and_fit`` (13-value grid, C chosen on a
  seeded stratified 10% holdout, final fit on all train);
* scikit-learn: load the .npy (timed), ``StandardScaler`` (once) and
  ``LogisticRegression(C, solver="lbfgs", max_iter=1000)`` for every C of the grid on the
  same holdout, then the final ``StandardScaler + LogisticRegression`` fit on all train.
  At 1,000 classes a full grid takes scikit-learn hours on 2 cores, so it fits a subset of
  the grid (``SKLEARN_SUBSET``; ``--sklearn-full`` for all of it) and its full-grid time is
  extrapolated: the subset's mean time per C times 13, plus its final fit. The output says so.

Timings are wall-clock and CPU seconds of that work only (data generation and imports
excluded); memory is the peak RSS above the RSS after imports.

Prints both times, the ratio, the chosen Cs, test accuracies and peak memory, and one JSON
line per class count (to ``--json PATH`` too). Usage::

    python bench/probe.py                  # full size, 10 and 100 classes
    python bench/probe.py --classes 1000   # n=100,000, d=768; scikit-learn on 2 of the 13 Cs
    python bench/probe.py --quick          # n=5,000, 10 classes: a smoke run
    python bench/probe.py --n 20000 --classes 100 --json out.jsonl
    python bench/probe.py --classes 100 --sklearn-tol 1e-6   # a converged scikit-learn reference

scikit-learn's default ``tol=1e-4`` can stop short of the optimum (100 classes, larger C):
its accuracy then differs from backbench's (``tol=1e-5``) by more than rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK_BYTES = 4 << 20
SEPARATION = {10: 0.25, 100: 0.35, 1000: 0.5}  # class-mean spread: ~85% / ~80% test accuracy at n=50,000
SIZES = {10: (50_000, 1280), 100: (50_000, 1280), 1000: (100_000, 768)}  # default (n, d) per class count
SKLEARN_SUBSET = {1000: (3, 6)}  # grid indices scikit-learn fits where the full grid takes hours
SPEEDUP_TARGET, ACCURACY_MARGIN, MEMORY_TARGET = 20.0, 0.1, 3.0


def make_classes(d: int, n_classes: int, *, seed: int = 0) -> dict:
    """Gaussian class means, correlated noise (power-law spectrum) and a per-feature offset."""
    rng = np.random.default_rng(seed)
    spec = np.arange(1, d + 1, dtype=np.float32) ** -0.5
    spec *= np.sqrt(d / float((spec**2).sum()))
    Q, _ = np.linalg.qr(rng.standard_normal((d, d), dtype=np.float32))
    sep = SEPARATION.get(n_classes, 0.3) * d**-0.25  # per-feature spread of the class means
    return {"noise": (Q * spec).T, "means": rng.standard_normal((n_classes, d), dtype=np.float32) * sep,
            "offset": rng.uniform(0.0, 2.0, d).astype(np.float32)}


def sample(spec: dict, n: int, *, seed: int, block: int = 8192):
    """Yields ``(start, X_block float16, y_block)``: ``n`` rows, never all held in float32."""
    rng = np.random.default_rng(seed)
    n_classes, d = spec["means"].shape
    for start in range(0, n, block):
        m = min(block, n - start)
        y = rng.integers(0, n_classes, m)
        X = rng.standard_normal((m, d), dtype=np.float32) @ spec["noise"] + spec["means"][y] + spec["offset"]
        yield start, X.astype(np.float16), y


def write_dataset(folder: Path, n: int, n_test: int, d: int, n_classes: int) -> None:
    """``{train,test}.zarr`` (features, labels) and ``{train,test}_{X,y}.npy`` in ``folder``."""
    import zarr

    rows = max(1, CHUNK_BYTES // (2 * d))
    spec = make_classes(d, n_classes)
    for seed, (split, size) in enumerate((("train", n), ("test", n_test)), start=1):
        root = zarr.open_group(folder / f"{split}.zarr", mode="w")
        Xz = root.create_array("features", shape=(size, d), chunks=(rows, d), dtype="float16",
                               compressors=None, dimension_names=("sample", "feature"))
        Xn = np.lib.format.open_memmap(folder / f"{split}_X.npy", mode="w+", dtype=np.float16, shape=(size, d))
        y = np.empty(size, dtype=np.int64)
        for start, Xb, yb in sample(spec, size, seed=seed, block=rows * 4):
            Xz[start : start + len(Xb)] = Xb
            Xn[start : start + len(Xb)], y[start : start + len(Xb)] = Xb, yb
        Xn.flush()
        del Xn
        root.create_array("labels", data=y, chunks=(size,), compressors=None, dimension_names=("sample",))
        np.save(folder / f"{split}_y.npy", y)


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def read_zarr(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features as float32 (converted chunk by chunk into one array) and labels."""
    import zarr

    root = zarr.open_group(path, mode="r")
    src = root["features"]
    X = np.empty(src.shape, dtype=np.float32)
    step = src.chunks[0]
    for i in range(0, src.shape[0], step):
        X[i : i + step] = src[i : i + step]
    return X, root["labels"][:]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_backbench(folder: Path, Cs: list[float]) -> dict:
    import sklearn.model_selection  # noqa: F401  (libraries load before the memory baseline)
    import torch  # noqa: F401
    import zarr  # noqa: F401

    from backbench.probe.linear import select_and_fit

    base, _ = _rss_mb()
    start, cpu = time.perf_counter(), _cpu_s()
    X, y = read_zarr(folder / "train.zarr")
    read_s = time.perf_counter() - start
    probe, sweep = select_and_fit(X, y, Cs, seed=0)
    seconds, cpu = time.perf_counter() - start, _cpu_s() - cpu
    X_test, y_test = read_zarr(folder / "test.zarr")
    accuracy = float(probe.score(X_test, y_test))
    _, peak = _rss_mb()
    return {"seconds": seconds, "cpu_s": cpu, "read_s": read_s, "best_C": sweep.best_C, "test_accuracy": accuracy,
            "val_accuracy": sweep.val_accuracy, "n_iter": sweep.n_iter, "final_n_iter": probe.n_iter_,
            "baseline_rss_mb": base, "peak_rss_mb": peak}


def run_sklearn(folder: Path, Cs: list[float], tol: float = 1e-4, subset: list[int] | None = None) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    warnings.simplefilter("ignore", ConvergenceWarning)
    base, _ = _rss_mb()
    start, cpu = time.perf_counter(), _cpu_s()
    X = np.load(folder / "train_X.npy").astype(np.float32)
    y = np.load(folder / "train_y.npy")
    read_s = time.perf_counter() - start
    fit, held = train_test_split(np.arange(len(y)), test_size=0.1, stratify=y, random_state=0)
    fit, held = np.sort(fit), np.sort(held)
    scaler = StandardScaler().fit(X[fit])  # scaled once for the whole grid, in scikit-learn's favour
    X_fit, X_held = scaler.transform(X[fit]), scaler.transform(X[held])
    Cs = Cs if subset is None else [Cs[i] for i in subset]
    val, n_iter = [], []
    for C in Cs:
        model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=tol).fit(X_fit, y[fit])
        val.append(float(model.score(X_held, y[held])))
        n_iter.append(int(model.n_iter_[0]))
    del X_fit, X_held
    best = int(np.argmax(val))
    sweep_s = time.perf_counter() - start
    final = make_pipeline(StandardScaler(), LogisticRegression(C=Cs[best], solver="lbfgs", max_iter=1000, tol=tol))
    final.fit(X, y)
    seconds, cpu = time.perf_counter() - start, _cpu_s() - cpu
    accuracy = float(final.score(np.load(folder / "test_X.npy").astype(np.float32), np.load(folder / "test_y.npy")))
    _, peak = _rss_mb()
    return {"seconds": seconds, "cpu_s": cpu, "read_s": read_s, "best_C": Cs[best], "test_accuracy": accuracy,
            "val_accuracy": val, "n_iter": n_iter, "final_n_iter": int(final[-1].n_iter_[0]),
            "baseline_rss_mb": base, "peak_rss_mb": peak, "Cs": Cs, "sweep_s": sweep_s}


def _worker(side: str, folder: str, sklearn_tol: str, subset: str) -> None:
    from backbench.probe.linear import default_Cs

    Cs = [float(C) for C in default_Cs()]
    if side == "backbench":
        result = run_backbench(Path(folder), Cs)
    else:
        result = run_sklearn(Path(folder), Cs, float(sklearn_tol), json.loads(subset))
    print(json.dumps(result))


def _spawn(side: str, folder: Path, sklearn_tol: float = 1e-4, subset: list[int] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    argv = [sys.executable, __file__, "--worker", side, str(folder), repr(sklearn_tol), json.dumps(subset)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_one(n: int, n_test: int, d: int, n_classes: int, skip_sklearn: bool, sklearn_tol: float = 1e-4,
              subset: list[int] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        folder = Path(tmp)
        write_dataset(folder, n, n_test, d, n_classes)
        bb = _spawn("backbench", folder)
        sk = None if skip_sklearn else _spawn("sklearn", folder, sklearn_tol, subset)
    f32_mb = (n + n_test) * d * 4 / 2**20
    used = bb["peak_rss_mb"] - bb["baseline_rss_mb"]
    record = {
        "bench": "probe", "n": n, "n_test": n_test, "d": d, "classes": n_classes,
        "backbench_s": round(bb["seconds"], 2), "backbench_cpu_s": round(bb["cpu_s"], 2),
        "backbench_read_s": round(bb["read_s"], 2), "backbench_val_acc": bb["val_accuracy"],
        "backbench_best_C": bb["best_C"], "backbench_test_acc": bb["test_accuracy"],
        "backbench_n_iter": bb["n_iter"], "backbench_final_n_iter": bb["final_n_iter"],
        "features_f32_mb": round(f32_mb, 1), "backbench_peak_rss_mb": round(bb["peak_rss_mb"], 1),
        "backbench_mem_above_baseline_mb": round(used, 1), "backbench_mem_ratio": round(used / f32_mb, 2),
    }
    if sk is not None and subset is not None:  # the full grid's time: the subset's per-C mean x 13, + final fit
        grid = len(bb["val_accuracy"])
        sk["measured_s"], sk["measured_cpu_s"] = sk["seconds"], sk["cpu_s"]
        scale = (sk["sweep_s"] - sk["read_s"]) * (grid / len(sk["Cs"]) - 1)
        sk["seconds"] += scale
        sk["cpu_s"] *= sk["seconds"] / sk["measured_s"]
        record.update({"sklearn_Cs": sk["Cs"], "sklearn_measured_s": round(sk["measured_s"], 2),
                       "sklearn_s_is": f"extrapolated from {len(sk['Cs'])} of {grid} C values"})
    if sk is not None:
        record.update({
            "sklearn_s": round(sk["seconds"], 2), "sklearn_cpu_s": round(sk["cpu_s"], 2),
            "sklearn_best_C": sk["best_C"], "sklearn_val_acc": sk["val_accuracy"],
            "sklearn_test_acc": sk["test_accuracy"], "sklearn_n_iter": sk["n_iter"],
            "sklearn_peak_rss_mb": round(sk["peak_rss_mb"], 1),
            "speedup": round(sk["seconds"] / bb["seconds"], 1),
            "speedup_cpu": round(sk["cpu_s"] / bb["cpu_s"], 1),
            "acc_diff_points": round(100 * (bb["test_accuracy"] - sk["test_accuracy"]), 2),
            "sklearn_final_n_iter": sk["final_n_iter"], "sklearn_tol": sklearn_tol,
        })
    record["load_avg_1min"] = round(os.getloadavg()[0], 2)  # the machine is shared: context for the times
    return record


def _report(r: dict) -> None:
    print(f"\n== {r['classes']} classes, n={r['n']} (+{r['n_test']} test), d={r['d']} ==")
    print(f"backbench     {r['backbench_s']:8.2f} s (read {r['backbench_read_s']:.2f} s)  C={r['backbench_best_C']:.4g}"
          f"  test acc {100 * r['backbench_test_acc']:.2f}%")
    if "sklearn_s" in r:
        print(f"scikit-learn  {r['sklearn_s']:8.2f} s                 C={r['sklearn_best_C']:.4g}"
              f"  test acc {100 * r['sklearn_test_acc']:.2f}%  (tol={r['sklearn_tol']:g})")
        if "sklearn_s_is" in r:
            print(f"  scikit-learn's time is {r['sklearn_s_is']} (measured {r['sklearn_measured_s']:.2f} s on C in "
                  f"{', '.join(f'{C:.3g}' for C in r['sklearn_Cs'])}, then its final fit); its C and accuracy are "
                  f"the best of that subset")
        print(f"speed-up x{r['speedup']} wall, x{r['speedup_cpu']} CPU time"
              f"  accuracy difference {r['acc_diff_points']:+.2f} points")
    print(f"backbench peak memory: {r['backbench_mem_above_baseline_mb']:.0f} MiB above the post-import baseline"
          f" = {r['backbench_mem_ratio']:.2f}x the float32 features ({r['features_f32_mb']:.0f} MiB);"
          f" peak RSS {r['backbench_peak_rss_mb']:.0f} MiB")
    if "sklearn_s" in r:
        checks = {f"speed-up >= {SPEEDUP_TARGET:g}x": r["speedup"] >= SPEEDUP_TARGET,
                  f"accuracy >= scikit-learn's - {ACCURACY_MARGIN:g} points": r["acc_diff_points"] >= -ACCURACY_MARGIN,
                  f"memory < {MEMORY_TARGET:g}x features": r["backbench_mem_ratio"] < MEMORY_TARGET}
        print("targets: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in checks.items()))
        if r["sklearn_tol"] > 1e-6:
            print(f"  (the accuracy target is against scikit-learn run to convergence: --sklearn-tol 1e-6)")


def _save_results(path: Path, record: dict) -> None:
    """Merge ``record`` into a JSON document of records, one per (classes, n, d): a rerun replaces its own."""
    doc = json.loads(path.read_text()) if path.exists() else {"bench": "probe", "records": []}
    key = lambda r: (r["classes"], r["n"], r["d"])  # noqa: E731
    doc["records"] = sorted([r for r in doc["records"] if key(r) != key(record)] + [record], key=key)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="train rows (default 50,000; 100,000 at 1,000 classes)")
    parser.add_argument("--n-test", type=int, default=None, help="test rows (default n/5)")
    parser.add_argument("--d", type=int, default=None, help="feature width (default 1,280; 768 at 1,000 classes)")
    parser.add_argument("--classes", type=int, choices=sorted(SIZES), default=None,
                        help="one case (default 10 and 100; 1,000 only when asked: scikit-learn takes long)")
    parser.add_argument("--quick", action="store_true", help="n=5,000 and 10 classes, for a smoke run")
    parser.add_argument("--skip-sklearn", action="store_true", help="time backbench only")
    parser.add_argument("--sklearn-full", action="store_true",
                        help="scikit-learn on the whole grid even where SKLEARN_SUBSET would spare hours")
    parser.add_argument("--sklearn-tol", type=float, default=1e-4,
                        help="LogisticRegression's tol (default 1e-4, its own default; 1e-6 for a converged reference)")
    parser.add_argument("--json", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--results", type=Path, default=None,
                        help="also merge the records into this JSON document (e.g. bench/results/probe-2core.json)")
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "FOLDER", "TOL", "SUBSET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(*args.worker)
    cases = [args.classes] if args.classes else ([10] if args.quick else [10, 100])
    for n_classes in cases:
        n, d = SIZES[n_classes]
        n, d = args.n or (5_000 if args.quick else n), args.d or d
        subset = None if args.sklearn_full else SKLEARN_SUBSET.get(n_classes)
        record = bench_one(n, args.n_test or n // 5, d, n_classes, args.skip_sklearn, args.sklearn_tol,
                           None if subset is None else list(subset))
        record["command"] = "python bench/probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
        _report(record)
        line = json.dumps(record)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(line + "\n")
        if args.results:
            _save_results(args.results, record)


if __name__ == "__main__":
    main()
