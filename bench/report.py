"""The report's statistics against what a user would write instead, in one run.

A leaderboard of ``--backbones`` backbones x ``--columns`` (task, dataset) columns of probe
records, each with ``--n`` evaluated samples (per-sample ``correct`` outcomes at accuracies
that differ slightly between backbones), then:

* backbench: ``build(records, bootstrap=B)``: every cell's paired 95 % interval, the rank
  intervals from leaderboard replicates, P(a beats b), Friedman + Wilcoxon-Holm, the three
  aggregates with intervals and the leave-one-task-out stability;
* the alternative: ``scipy.stats.bootstrap`` (percentile, vectorised, the same B) on each cell
  alone: intervals of the cells only, no ranks, no pairing.

Prints both wall times and the ratio (scipy's time over backbench's). Usage::

    python bench/report.py                    # 10 backbones x 8 columns x 10,000 samples, B = 1,000
    python bench/report.py --quick            # 4 x 4 x 2,000
    python bench/report.py --json bench/results/report-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def records(backbones: int, columns: int, n: int, seed: int = 0):
    """Probe records with their ``correct`` outcome arrays (in memory), and the reader of those."""
    rng = np.random.default_rng(seed)
    recs, arrays = [], {}
    for b in range(backbones):
        for c in range(columns):
            correct = rng.random(n) < 0.6 + 0.01 * b
            predicted = np.where(correct, 0, 1).astype(np.int8)
            key = f"b{b}-d{c}"
            arrays[key] = {"correct": correct, "predicted": predicted}
            recs.append({"task": "probe", "backbone": f"backbone-{b}", "dataset": f"d{c}", "key": key,
                         "metrics": {"top1": float(correct.mean())}, "params": {}, "seed": 0, "created": "2026",
                         "outcomes": {"correct": {}, "predicted": {}}})
    return recs, (lambda r: arrays[r["key"]]), arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", type=int, default=10)
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.backbones, args.columns, args.n = 4, 4, 2000
    from scipy.stats import bootstrap

    from backbench.report.leaderboard import build

    recs, outcomes, arrays = records(args.backbones, args.columns, args.n)
    start = time.perf_counter()
    lb = build(recs, outcomes=outcomes, bootstrap=args.bootstrap)
    ours = time.perf_counter() - start
    cells = [c for c in lb.stats.cells.values() if c.low is not None]
    assert len(cells) == args.backbones * args.columns, "every cell should have an interval"
    start = time.perf_counter()
    for a in arrays.values():
        bootstrap((a["correct"].astype(np.float64),), np.mean, n_resamples=args.bootstrap, method="percentile",
                  vectorized=True, random_state=0)
    theirs = time.perf_counter() - start
    result = {"bench": "report", "backbones": args.backbones, "columns": args.columns, "n": args.n,
              "bootstrap": args.bootstrap, "backbench_s": round(ours, 3), "scipy_cells_only_s": round(theirs, 3),
              "speedup": round(theirs / ours, 2), "cpus": os.cpu_count(), "machine": platform.processor() or
              platform.machine()}
    print(f"{args.backbones} backbones x {args.columns} columns x {args.n:,} samples, {args.bootstrap} resamples")
    print(f"backbench build (cells, ranks, pairwise, stability): {ours:.2f} s")
    print(f"scipy.stats.bootstrap per cell (cells only):         {theirs:.2f} s")
    print(f"ratio (scipy / backbench): {theirs / ours:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
