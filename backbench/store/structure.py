"""What a well-formed cache looks like, as rules with no I/O of their own.

Two shapes are checked here, so the readers that must refuse what breaks them share one
statement of each: a group path (three safe parts, never into the results log), and a
group's structure (its attributes against the arrays :meth:`FeatureGroup.create` makes).
The checks take the group as an argument, so this module imports nothing from ``group``.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import numpy as np

RESULTS = "_results"  # the results log's folder at the cache's root
_PART = re.compile(r"^[A-Za-z0-9_~+@-][A-Za-z0-9._~+@-]*$")  # one part of a group path: no ".", "..", "%", "/"


class GroupLike(Protocol):
    """What :func:`structure_problem` reads of a group (a :class:`FeatureGroup`)."""

    @property
    def attrs(self) -> dict[str, Any]: ...

    @property
    def has_logits(self) -> bool: ...

    def array(self, name: str) -> Any: ...


def part_ok(name: str) -> bool:
    """Whether ``name`` can be one part of a group path (letters, digits, ``. _ ~ + @ -``, no leading ``.``)."""
    return bool(_PART.match(name))


def group_path_ok(path: str) -> str | None:
    """``path`` if it is a group path inside a cache (three parts of letters, digits and
    ``. _ ~ + @ -``, none empty, none starting with ``.``, not the results log), else None."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] == RESULTS or not all(_PART.match(p) for p in parts):
        return None
    return path


def array_specs(n: int, dim: int, num_classes: int, dtype: np.dtype, rows: int) -> dict[str, dict[str, Any]]:
    """zarr ``create_array`` arguments of a new group's arrays: ``rows`` rows per chunk, uncompressed
    features, labels, ids and checksums, and (``num_classes``) the backbone's logits."""
    n_chunks = -(-n // rows) if n else 0
    common = {"chunks": (rows,), "dimension_names": ["sample"]}
    arrays = {
        "features": dict(shape=(n, dim), dtype=dtype, chunks=(rows, dim), compressors=None, fill_value=0,
                         dimension_names=["sample", "feature"]),
        "labels": dict(shape=(n,), dtype="int64", fill_value=-1, compressors=None, **common),
        "ids": dict(shape=(n,), dtype=str, fill_value="", compressors=None, **common),
        "chunk_checksum": dict(shape=(n_chunks,), dtype="int64", chunks=(1,), fill_value=-1, compressors=None,
                               dimension_names=["chunk"]),
    }
    if num_classes:
        arrays["logits"] = dict(shape=(n, num_classes), dtype=dtype, chunks=(rows, num_classes), fill_value=0,
                                dimension_names=["sample", "class"])
    return arrays


def _attribute_problem(a: dict[str, Any]) -> str | None:
    """What is wrong with a group's attributes on their own (types, counts, chunk arithmetic), or None."""
    for key in ("n", "dim", "chunk_rows", "n_chunks"):
        if type(a.get(key)) is not int or a[key] < (1 if key in ("dim", "chunk_rows") else 0):
            return f"attribute {key!r} is {a.get(key)!r}, not a count"
    if not isinstance(a.get("classes", []), list):
        return f"attribute 'classes' is {a.get('classes')!r}, not a list"
    for key in ("backbone", "dataset", "split", "dtype"):
        if not isinstance(a.get(key), str):
            return f"attribute {key!r} is {a.get(key)!r}, not a name"
    if a.get("checksum", "crc32") not in ("crc32", "crc32c"):
        return f"attribute 'checksum' is {a.get('checksum')!r}, not crc32c"
    n, rows = a["n"], a["chunk_rows"]
    if a["n_chunks"] != -(-n // rows):
        return f"attributes n={n}, chunk_rows={rows} and n_chunks={a['n_chunks']} disagree ({-(-n // rows)} chunks)"
    return None


def structure_problem(group: GroupLike) -> str | None:
    """What is wrong with the group's structure (attributes against arrays), or None."""
    a = group.attrs
    problem = _attribute_problem(a)
    if problem:
        return problem
    n, rows = a["n"], a["chunk_rows"]
    want = {"features": ((n, a["dim"]), a["dtype"], rows, "n, dim"), "labels": ((n,), "int64", rows, "n"),
            "ids": ((n,), None, rows, "n"), "chunk_checksum": ((a["n_chunks"],), None, 1, "n_chunks")}
    if group.has_logits:
        want["logits"] = (None, a["dtype"], rows, "n")
    for name, (shape, dtype, chunk, keys) in want.items():
        arr = group.array(name)
        if shape is not None and tuple(arr.shape) != shape:
            return f"attributes {keys} say shape {shape} but the {name} array has {tuple(arr.shape)}"
        if name == "logits" and (arr.ndim != 2 or arr.shape[0] != n):
            return f"attribute n={n} disagrees with the logits array's shape {tuple(arr.shape)}"
        if dtype is not None and arr.dtype != np.dtype(dtype):
            return f"attribute dtype={a['dtype']!r} disagrees with the {name} array's dtype {arr.dtype}"
        if arr.chunks[0] != chunk:
            return f"attribute chunk_rows={rows} disagrees with the {name} array's chunks of {arr.chunks[0]} rows"
    return None
