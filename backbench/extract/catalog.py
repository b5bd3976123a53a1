"""What can be named: each source's ids, and which weights are already on this machine.

Each registered source lists its own ids (``Source.list_ids``: timm's and open_clip's
architectures, torchvision's image classifiers, the transformers repos in the local Hugging
Face cache, plugins' own) and what is on this machine (``Source.on_machine``).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from backbench.extract.backbones import SOURCES, ensure_sources
from backbench.extract.backbones.hub import hub_cached


def _match(name: str, pattern: str | None) -> bool:
    if not pattern:
        return True
    if any(ch in pattern for ch in "*?["):  # a glob matches the whole name or the name within its source
        return any(fnmatch.fnmatchcase(n, pattern) for n in (name, name.partition(":")[2]))
    return pattern.lower() in name.lower()


def on_machine() -> list[dict[str, Any]]:
    """Backbones whose weights need no download: known packages and the hub cache."""
    ensure_sources()
    rows = [{"name": name, "on_machine": True, "weights": note}
            for src in SOURCES.values() for name, note in src.on_machine()]
    for repo in sorted(hub_cached()):
        if repo.startswith("timm/"):
            rows.append({"name": f"timm:{repo[5:]}", "on_machine": True, "weights": "Hugging Face hub cache"})
    return rows


def catalog(source: str | None = None, pattern: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Names of ``source`` (or every source) matching ``pattern`` (substring or glob)."""
    ensure_sources()
    ready = {r["name"]: r for r in on_machine()}
    rows: list[dict[str, Any]] = [r for r in ready.values() if _match(r["name"], pattern)
                                  and (source is None or r["name"].startswith(source + ":"))]
    for name in sorted(SOURCES) if source is None else [source]:
        for ident in SOURCES[name].list_ids():
            full = f"{name}:{ident}"
            if full not in ready and _match(full, pattern):
                rows.append({"name": full, "on_machine": False, "weights": SOURCES[name].catalog_note})
            if len(rows) >= limit:
                return rows
    return rows
