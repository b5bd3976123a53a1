"""One row-block iterator for every probe that reads features a block at a time.

The solver, kNN, search, OOD scorers and streamed reads all walk a 2-D array (numpy, torch,
zarr, h5py, or a lazy :class:`~backbench.probe.stream.GroupRows`) by rows, so that memory holds
one block, never the whole matrix. :func:`iter_blocks` is that walk, with the conversions and
checks they share made in one place. Light: numpy only (torch is never imported here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from backbench.errors import ProbeInputError

NOT_FINITE = "{name} contains NaN or infinite values; drop or impute them before {purpose}"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (float32, modified in place) scaled to unit norm; zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    x /= np.maximum(norms, np.float32(1e-12))
    return x


class ChunkedRows:
    """A lazy row matrix stored in chunks (:class:`~backbench.probe.stream.GroupRows`): its
    :meth:`blocks` reads each stored chunk once, in order. A base class here, so this module
    needs nothing from the modules that read caches."""

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:  # pragma: no cover - abstract
        """``(first row, rows)`` per stored chunk, in order."""
        raise NotImplementedError


def _finite(block: Any) -> bool:
    """True when every value of a numpy array or torch tensor is finite (tensors stay on their device)."""
    if hasattr(block, "isfinite"):
        return bool(block.isfinite().all())
    return bool(np.isfinite(block).all())


def iter_blocks(X: Any, rows: int, *, dtype: Any = None, normalize: bool = False,
                check_finite: bool | str = False, stored_chunks: bool = False) -> Iterator[tuple[int, Any]]:
    """``(start, block)`` for consecutive blocks of ``rows`` rows of ``X``, in order.

    - ``dtype=None`` yields ``X``'s own slices (views; tensors stay tensors); a ``dtype`` yields
      fresh C-contiguous numpy copies in it, which the caller may modify in place.
    - ``normalize`` scales each copy's rows to unit L2 norm (give ``dtype=np.float32``).
    - ``check_finite``: True, or the message to raise, when a block holds NaN or inf
      (:class:`ProbeInputError`; checked before normalizing).
    - ``stored_chunks``: a lazy :class:`ChunkedRows` goes by its stored chunks instead (one
      pass over the cache, each chunk read once), as the solver reads it.

    ``rows`` below 1 raises :class:`ProbeInputError` (``batch_size must be a positive integer``).
    """
    if int(rows) < 1:
        raise ProbeInputError(f"batch_size must be a positive integer, got {rows}")
    step = int(rows)
    if stored_chunks and isinstance(X, ChunkedRows):
        parts: Iterator[tuple[int, Any]] = X.blocks()
    else:
        parts = ((start, X[start : start + step]) for start in range(0, X.shape[0], step))
    message = check_finite if isinstance(check_finite, str) else NOT_FINITE.format(name="X", purpose="use")
    for start, block in parts:
        if dtype is not None:
            block = np.array(block, dtype=dtype, order="C", copy=True)
        if check_finite and not _finite(block):
            raise ProbeInputError(message)
        if normalize:
            l2_normalize(block)
        yield start, block
