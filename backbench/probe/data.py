"""Reading probe inputs from the cache, with the checks every task needs before fitting."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from backbench.errors import ProbeInputError
from backbench.store.cache import Cache
from backbench.store.group import FeatureGroup


@dataclass
class Split:
    """Features (float32), labels and class names of one cache group."""

    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    group: FeatureGroup
    name: str
    logits: np.ndarray | None = None
    joined: tuple[str, ...] = ()  # cache keys of the groups concatenated into X, if several

    @property
    def key(self) -> str:
        if self.joined:
            return hashlib.sha256("+".join(self.joined).encode()).hexdigest()
        return self.group.attrs["cache_key"]

    @property
    def label(self) -> str:
        return f"{self.group.attrs['dataset']}/{self.name}"


def load_split(cache: Cache, backbone: str, dataset: str, split: str, *, complete_only: bool = False,
               logits: bool = False, memory_limit: int | str | None = None, kind: str | None = None) -> Split:
    """Read a group as float32; skipped samples (label -1) are dropped; NaN/inf is refused.

    ``kind``: the feature kind(s) (default ``pooled``); several, comma-separated, are
    concatenated column-wise (in memory), as DINOv2 concatenates its last blocks.

    When the float32 features would take more than ``memory_limit`` bytes (default:
    :func:`~backbench.probe.stream.resolve_memory_limit`), ``X`` is a lazy
    :class:`~backbench.probe.stream.GroupRows` read chunk by chunk (NaN/inf refused as read).
    """
    from backbench.kinds import probe_kinds
    from backbench.probe.stream import GroupRows, resolve_memory_limit

    kinds = probe_kinds(kind or "pooled")
    if len(kinds) > 1:
        parts = [load_split(cache, backbone, dataset, split, complete_only=complete_only, logits=logits,
                            memory_limit=1 << 62, kind=k) for k in kinds]
        for p in parts[1:]:
            if not np.array_equal(p.y, parts[0].y):
                raise ProbeInputError(f"the feature kinds {kinds} of {dataset}/{split} cover different rows; "
                                      f"extract them together")
        return Split(np.hstack([p.X for p in parts]), parts[0].y, parts[0].classes, parts[0].group, split, parts[0].logits,
                     tuple(p.key for p in parts))
    group = cache.group(backbone, dataset, split, kinds[0])
    rows = group.rows(complete_only)
    if len(rows) * group.dim * 4 > resolve_memory_limit(memory_limit):
        y = group.labels(complete_only=complete_only)
        keep = y >= 0
        L = group.logits(complete_only=complete_only, dtype=np.float32) if logits and group.has_logits else None
        return Split(GroupRows.of(group, rows[keep]), y[keep], list(group.attrs["classes"]), group, split,
                     L[keep] if L is not None else None)
    X, y = group.read_labeled(complete_only=complete_only, dtype=np.float32)
    L = group.logits(complete_only=complete_only, dtype=np.float32) if logits and group.has_logits else None
    keep = y >= 0
    if not keep.all():
        X, y, L = X[keep], y[keep], (L[keep] if L is not None else None)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ProbeInputError(
            f"{group.path}: {int(bad.sum())} of {len(X)} rows hold NaN or inf features; re-extract it with "
            f"--overwrite (with --dtype float32 if float16 overflowed)"
        )
    return Split(X, y, list(group.attrs["classes"]), group, split, L)


def check_same_backbone(a: Split, b: Split) -> None:
    """Refuse to mix features from different weights or preprocessing."""
    for key, what in (("weights_sha256", "weights"), ("preprocess", "preprocessing"),
                      ("feature_kind", "feature kind")):
        if a.group.attrs.get(key) != b.group.attrs.get(key):
            raise ProbeInputError(
                f"{a.label} and {b.label} were extracted with different {what} "
                f"({a.group.attrs['backbone']} vs {b.group.attrs['backbone']}); re-extract one of them"
            )


def check_same_classes(a: Split, b: Split) -> None:
    if a.classes != b.classes:
        raise ProbeInputError(
            f"{a.label} has classes {_short(a.classes)} but {b.label} has {_short(b.classes)}; "
            f"probe splits of the same dataset"
        )


def _short(items: list[Any]) -> str:
    return str(items if len(items) <= 6 else [*items[:5], "..."])
