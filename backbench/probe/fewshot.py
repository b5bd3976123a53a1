"""Few-shot training subsets: exactly ``k`` samples per class, drawn with a seeded generator."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backbench.errors import ProbeInputError


def few_shot_indices(y, k: int, seed: int, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Sorted row indices into ``y``: ``k`` per class, without replacement, the same for the same seed.

    A class with fewer than ``k`` samples raises :class:`ProbeInputError` naming it
    (``class_names[label]`` when given, for integer labels).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ProbeInputError(f"y must be 1-D (one label per sample), got shape {y.shape}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ProbeInputError(f"k (shots per class) must be a positive integer, got {k!r}")
    rng = np.random.default_rng(seed)
    classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    short = np.flatnonzero(counts < k)
    if len(short):
        c = short[0]
        raise ProbeInputError(f"class {_name(classes[c], class_names)!r} has only {counts[c]} samples, fewer than "
                              f"k={k} shots; lower k or drop that class")
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = [rng.choice(order[s : s + n], size=int(k), replace=False) for s, n in zip(starts, counts)]
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, dtype=np.int64)


def _name(label, class_names: Sequence[str] | None) -> str:
    if class_names is not None and np.issubdtype(type(label), np.integer) and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return str(label)
