"""What each backbone costs, read from the caches behind the records: parameters and forward
GFLOPs per image, both properties of the model, never of the machine that ran it (no images/s).

Extraction stores both in every group's ``backbone_info`` (``n_params``, and ``gflops``: torch's
FLOP counter, a multiply-add counting 2, see :mod:`backbench.extract.flops`). Groups written
before ``gflops`` existed, or of a model the counter cannot run, give None ("n/a" in the report).
"""

from __future__ import annotations

from typing import Any, Iterable


def cost_table(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``{backbone: {"n_params": float, "gflops": float | None}}`` from the feature groups of the
    records' caches; a cache that cannot be opened (moved, deleted) is left out, so the report
    still renders, without that cost."""
    from backbench.store.cache import Cache

    out: dict[str, dict[str, float | None]] = {}
    for path in sorted({r.get("cache") for r in records if r.get("cache")}):
        try:
            groups = [g.attrs for g in Cache(path, mode="r").groups()]
        except Exception:  # noqa: BLE001 - any unreadable cache: the report renders without its cost
            continue
        for attrs in groups:
            info = attrs.get("backbone_info") or {}
            entry = out.setdefault(attrs["backbone"], {"n_params": 0.0, "gflops": None})
            entry["n_params"] = float(info.get("n_params") or 0) or entry["n_params"]
            if info.get("gflops") is not None:
                entry["gflops"] = float(info["gflops"])
    return out
