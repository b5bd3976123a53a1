"""Export cache groups to HDF5 (h5py): the same arrays and attributes, no pickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from backbench.store.cache import Cache


def _h5_attr(value: Any) -> Any:
    """HDF5 attributes hold scalars and strings; anything nested goes in as JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def export_h5(cache: Cache, target: str | Path, *, chunk_rows: int | None = None) -> list[str]:
    """Copy every group of ``cache`` into the HDF5 file ``target``; returns the group paths."""
    import h5py

    written = []
    with h5py.File(target, "w") as h5:
        h5.attrs["backbench"] = "feature cache export"
        h5.attrs["source_cache"] = str(cache.path)
        for group in cache.groups():
            g = h5.require_group(group.path)
            for key, value in group.attrs.items():
                g.attrs[key] = _h5_attr(value)
            for name in ("features", "labels", "ids", "logits", "chunk_checksum"):
                if name not in group.node:
                    continue
                arr = group.node[name]
                data = arr[:]
                if data.dtype.kind in "OUT" or str(data.dtype).startswith("StringDType"):
                    data = np.asarray(data, dtype=object).astype(str).astype(h5py.string_dtype())
                rows = chunk_rows or (arr.chunks[0] if arr.chunks and arr.chunks[0] else None)
                chunks = (min(rows, len(data)),) + data.shape[1:] if rows and len(data) else None
                ds = g.create_dataset(name, data=data, chunks=chunks)
                ds.attrs["dimension_names"] = json.dumps(list(arr.metadata.dimension_names or []))
            written.append(group.path)
    return written
