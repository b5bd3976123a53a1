"""What the dense probes share: feature maps read by row slices, a seeded batch order, a schedule.

The maps are any array-like of shape (n, h, w, d) with ``len``, ``shape`` and row slices that
return float32 arrays (a numpy array, or :class:`~backbench.probe.maps.MapArray` streaming a
cache). The probes read them only through :func:`read_block`, one contiguous slice at a time,
in the order :func:`epoch_blocks` draws, so a streamed cache and the same numbers in memory
train identically for a seed. Heavy (torch).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from backbench.errors import ProbeInputError

WARMUP_FRACTION = 0.04  # DINOv2's linear heads: 1,500 warmup iterations of 40,000
WINDOW_ROWS = 64  # batches are shuffled within windows of rows, windows among themselves (see epoch_blocks)


def map_shape(maps: Any, what: str) -> tuple[int, int, int, int]:
    """``(n, h, w, d)`` of a feature-map array-like; refuses anything that is not 4-D and non-empty."""
    shape = tuple(int(s) for s in getattr(maps, "shape", ()))
    if len(shape) != 4:
        raise ProbeInputError(f"{what} must be feature maps of shape (samples, h, w, features), got shape {shape}")
    if min(shape) < 1:
        raise ProbeInputError(f"{what} is empty (shape {shape}); a dense probe needs at least one map")
    if len(maps) != shape[0]:
        raise ProbeInputError(f"{what} has len {len(maps)} but shape {shape}; they must agree")
    return shape  # type: ignore[return-value]


def check_pair(maps_shape: tuple[int, ...], labels: Sequence, what: str) -> None:
    """Refuses labels (masks or boxes) whose count differs from the maps'."""
    if len(labels) != maps_shape[0]:
        raise ProbeInputError(f"{what}: {maps_shape[0]} maps but {len(labels)} labels; they must match")


def same_grid(a: tuple[int, ...], b: tuple[int, ...], what: str) -> None:
    """Refuses maps of another grid or width than the training maps (another backbone or --map-grid)."""
    if tuple(a[1:]) != tuple(b[1:]):
        raise ProbeInputError(f"{what} maps are {tuple(b[1:])} (h, w, d) but the training maps are {tuple(a[1:])}; "
                              f"extract both with the same backbone and --map-grid")


def read_block(maps: Any, start: int, stop: int, device: str) -> torch.Tensor:
    """Rows ``start:stop`` of ``maps`` as a float32 (b, d, h, w) tensor on ``device`` (checked finite)."""
    block = np.asarray(maps[start:stop], dtype=np.float32)
    if block.ndim != 4 or block.shape[0] != stop - start:
        raise ProbeInputError(f"maps[{start}:{stop}] returned shape {block.shape}; expected {stop - start} maps "
                              f"of shape (h, w, d)")
    if not np.isfinite(block).all():
        raise ProbeInputError(f"maps rows {start}:{stop} contain NaN or infinite values; re-extract them")
    return torch.from_numpy(np.ascontiguousarray(block)).permute(0, 3, 1, 2).to(device)


def blocks(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` row slices of ``batch_size`` rows covering ``range(n)``."""
    if int(batch_size) < 1:
        raise ProbeInputError(f"batch_size must be a positive integer, got {batch_size}")
    return [(s, min(s + int(batch_size), n)) for s in range(0, n, int(batch_size))]


def epoch_blocks(parts: list[tuple[int, int]], epochs: int, seed: int) -> list[tuple[int, int]]:
    """The training order: each epoch visits every slice once, in a seeded order.

    Slices are grouped by the window of :data:`WINDOW_ROWS` rows they start in; an epoch visits
    the windows in a random order and each window's slices in a random order. The store's row
    chunks are whole multiples of 64 rows, so a streamed epoch decodes each chunk about once
    instead of once per batch, and the order depends on the slices alone, never on the array.
    """
    if int(epochs) < 0:
        raise ProbeInputError(f"epochs must be a non-negative integer, got {epochs}")
    windows: dict[int, list[tuple[int, int]]] = {}
    for part in parts:
        windows.setdefault(part[0] // WINDOW_ROWS, []).append(part)
    groups = list(windows.values())
    rng = np.random.default_rng(seed)
    order = []
    for _ in range(int(epochs)):
        for g in rng.permutation(len(groups)):
            order += [groups[g][i] for i in rng.permutation(len(groups[g]))]
    return order


def holdout_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask holding out ``fraction`` of ``n`` rows (at least one, never all)."""
    if not 0.0 < float(fraction) < 1.0:
        raise ProbeInputError(f"holdout must be between 0 and 1 (a fraction of train), got {fraction}; "
                              f"or give a val split")
    if n < 2:
        raise ProbeInputError(f"train has {n} image(s): too few to hold any out; give a val split")
    k = min(n - 1, max(1, int(round(fraction * n))))
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return held


def warmup_linear_decay(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over the first 4 % of ``steps`` then linear decay to 0 (mmseg's ``poly``, power 1)."""
    warmup = max(1, int(round(WARMUP_FRACTION * steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - (step - warmup) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
