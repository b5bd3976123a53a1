"""Iteration latency: wall time of the commands a person reruns, each as a fresh process.

Extracts ``timm:test_resnet@random`` (offline, random init) on the bundled digits (train
1,257 rows, test 540) into a temporary cache once, then times, each as its own process:

* the floor: ``python -c "import torch"`` (any command that fits a probe imports torch), and
  ``python -c "import torch, sklearn.base"`` (what a new probe or kNN fit imports: its estimators
  are scikit-learn estimators);
* ``backbench --help``, ``ls``, ``results``, ``info`` (light: import neither torch nor scikit-learn);
* ``probe`` with the default 13-value C grid (new), the same command again (its record reused),
  a new 3-value C grid (``--C``, new values each repetition); ``knn`` new and reused; ``report``.

Each figure is the median of ``--repeat`` runs; the ratio is that median over the floor's.
Probe and kNN runs pass ``--json`` and are checked to be new or reused as labelled. Usage::

    python bench/latency.py                       # 5 repetitions
    python bench/latency.py --quick               # 1 repetition: a smoke run
    python bench/latency.py --json bench/results/latency-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "timm:test_resnet@random"
EXTRACT = f"""
import backbench
for split in ("train", "test"):
    backbench.extract({BACKBONE!r}, "digits", cache={{cache!r}}, dataset="digits", split=split, device="cpu")
"""


def _backbench() -> list[str]:
    """The installed ``backbench`` script beside this interpreter, else ``python -m backbench``."""
    script = Path(sys.executable).with_name("backbench")
    return [str(script)] if script.exists() else [sys.executable, "-m", "backbench"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of ``cmd`` as a fresh process, and its stdout; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def _reused(stdout: str) -> list[bool]:
    data = json.loads(stdout)
    return [r["reused"] for r in (data if isinstance(data, list) else [data])]


def commands(cache: str, rep: int) -> list[tuple[str, list[str], bool | None]]:
    """(name, argv after ``backbench``, expected ``reused`` or None) for repetition ``rep``."""
    task = ["-b", BACKBONE, "-d", "digits", "--train", "train", "--eval", "test", "--cache", cache, "--json"]
    grid = [f"{c * (1 + rep / 100):.6g}" for c in (0.05, 0.5, 5.0)]  # a grid no earlier run used
    return [
        ("help", ["--help"], None),
        ("ls", ["ls", "--cache", cache], None),
        ("results", ["results", "--cache", cache], None),
        ("info", ["info", BACKBONE, "digits", "train", "--cache", cache], None),
        ("probe_new_default_grid", ["probe", *task, "--force"], False),
        ("probe_reused", ["probe", *task], True),
        ("probe_new_C_grid", ["probe", *task, "--C", *grid], False),
        ("knn_new", ["knn", *task, "-k", str(10 + rep)], False),
        ("knn_reused", ["knn", *task, "-k", str(10 + rep)], True),
        ("report", ["report", "--cache", cache], None),
    ]


def run(repeat: int, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BACKBENCH_CACHE"}
    cache = str(workdir / "latency.zarr")
    start = time.perf_counter()
    timed([sys.executable, "-c", EXTRACT.format(cache=cache)], env)
    print(f"extracted {BACKBONE} digits train+test in {time.perf_counter() - start:.1f} s", flush=True)
    walls: dict[str, list[float]] = {"import_torch": [], "import_torch_sklearn": []}
    for rep in range(repeat):
        walls["import_torch"].append(timed([sys.executable, "-c", "import torch"], env)[0])
        walls["import_torch_sklearn"].append(timed([sys.executable, "-c", "import torch, sklearn.base"], env)[0])
        for name, argv, reused in commands(cache, rep):
            wall, stdout = timed(_backbench() + argv, env)
            if reused is not None and any(r != reused for r in _reused(stdout)):
                sys.exit(f"backbench {' '.join(argv)}: expected reused={reused}, got {stdout[:300]}")
            walls.setdefault(name, []).append(wall)
    floor = statistics.median(walls["import_torch"])
    figures = {name: {"wall_s": round(statistics.median(w), 3), "min_s": round(min(w), 3),
                      "ratio_to_import_torch": round(statistics.median(w) / floor, 2)}
               for name, w in walls.items()}
    import torch  # noqa: PLC0415 - versions for the record, after every timing

    return {"bench": "latency", "backbone": BACKBONE, "repeat": repeat, "figures": figures,
            "machine": {"cpus": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="runs of each command (median reported)")
    p.add_argument("--quick", action="store_true", help="one run of each command")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bb-latency-") as tmp:
        result = run(1 if args.quick else args.repeat, Path(tmp))
    print(f"\n{'command':<24} {'median s':>9} {'min s':>7} {'x import torch':>15}")
    for name, f in result["figures"].items():
        print(f"{name:<24} {f['wall_s']:>9.2f} {f['min_s']:>7.2f} {f['ratio_to_import_torch']:>15.2f}")
    print(f"\n{result['machine']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
