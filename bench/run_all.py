"""Run every benchmark in bench/ and write one table of figures and ratios (markdown + JSON).

    python bench/run_all.py [--quick] [--out bench/out]

Each benchmark runs in its own process (``bench/NAME.py --json bench/out/NAME.json``); the
summary picks each one's headline figures: times, speed-ups, ratios, accuracies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("extract", "probe", "knn", "ood", "scale", "latency", "report")
HEADLINE = ("speedup", "ratio", "efficiency", "images_per_s", "_s", "acc", "agreement", "auroc", "mem")


def _load(path: Path) -> list[dict]:
    """A benchmark's JSON: one object, a list, or JSON lines."""
    text = path.read_text().strip()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for bench, objs in results.items():
        for i, obj in enumerate(objs):
            flat = _flatten(obj)
            for key, value in flat.items():
                if any(h in key.lower() for h in HEADLINE):
                    rows.append({"bench": bench if len(objs) == 1 else f"{bench}[{i}]", "figure": key,
                                 "value": round(value, 4) if isinstance(value, float) else value})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--only", nargs="+", choices=BENCHES)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    for name in args.only or BENCHES:
        target = args.out / f"{name}.json"
        target.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(target)] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd)
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code or not target.exists():
            failed.append(name)
            continue
        results[name] = _load(target)
    rows = summarize(results)
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "failed": failed}, indent=2))
    md = ["| bench | figure | value |", "|---|---|---|"] + [f"| {r['bench']} | {r['figure']} | {r['value']} |"
                                                           for r in rows]
    (args.out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {args.out / 'summary.md'} and {args.out / 'summary.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
