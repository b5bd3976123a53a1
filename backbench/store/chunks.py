"""Row chunks on disk: their checksums and the raw fast paths beside zarr's codec pipeline.

A group's arrays are chunked by rows. Uncompressed little-endian chunks on a local disk hold
exactly the C-order bytes of the (full-size) chunk, so they are read into, or written from,
a numpy buffer with no codec pipeline in between: the same bytes zarr reads and writes.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from backbench.store.cleanup import partial_name

CHECKSUM = "crc32c"  # integrity, not security: hardware CRC-32C (zarr's own dependency), ~15 GB/s


def _bytes(a: np.ndarray) -> np.ndarray:
    view = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    view.flags.writeable = False  # google_crc32c takes read-only buffers
    return view


def chunk_checksum(features: np.ndarray, labels: np.ndarray, algorithm: str = CHECKSUM) -> int:
    """CRC of the chunk's feature bytes, then its label bytes: CRC-32C, or CRC-32 (zlib) for schema-1 groups."""
    if algorithm == "crc32":
        return zlib.crc32(_bytes(labels), zlib.crc32(_bytes(features)))
    import google_crc32c

    return google_crc32c.extend(google_crc32c.value(_bytes(features)), _bytes(labels))


def is_local(arr) -> bool:
    """True for an array in a local folder; others (fsspec stores at URLs) always go through zarr."""
    from zarr.storage import LocalStore

    return isinstance(arr.store_path.store, LocalStore)


def raw_layout(arr) -> str | None:
    """"bytes" (plain native-endian), "vlen-utf8" (uncompressed strings) or None, for a local array."""
    from zarr.codecs import BytesCodec, VLenUTF8Codec

    codecs = arr.metadata.codecs
    if not is_local(arr) or len(codecs) != 1:
        return None
    if isinstance(codecs[0], VLenUTF8Codec):
        return "vlen-utf8"
    if isinstance(codecs[0], BytesCodec) and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder):
        return "bytes"
    return None


def chunk_key(arr, chunk: int) -> str:
    """The store key of row chunk ``chunk`` of ``arr`` (relative to the store's root)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))}"


def chunk_file(arr, chunk: int) -> Path:
    return Path(arr.store_path.store.root) / chunk_key(arr, chunk)


def raw_chunk_file(arr, chunk: int) -> Path | None:
    """The file of row chunk ``chunk`` when it is stored raw on a local disk, else None."""
    return chunk_file(arr, chunk) if raw_layout(arr) == "bytes" else None


def missing_chunks(arr, chunks: list[int]) -> list[int]:
    """Those of ``chunks`` that the store holds no data for (zarr would read them as fill values)."""
    if not chunks:
        return []
    if is_local(arr):
        return [c for c in chunks if not chunk_file(arr, c).is_file()]
    import asyncio

    from zarr.core.sync import sync

    store = arr.store_path.store

    async def exists() -> list[bool]:
        return await asyncio.gather(*(store.exists(chunk_key(arr, c)) for c in chunks))

    return [c for c, there in zip(chunks, sync(exists())) if not there]


def read_rows(arr, start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) of one whole row chunk into ``out`` (a C-contiguous view).

    A raw chunk whose file is missing raises FileNotFoundError (never zeros): every chunk
    backbench writes is a file, so a missing one was deleted.
    """
    rows = arr.chunks[0]
    path = raw_chunk_file(arr, start // rows) if start % rows == 0 else None
    if path is None:
        out[...] = arr[start:stop]
        return
    with open(path, "rb", buffering=0) as fh:
        got = fh.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        out[...] = arr[start:stop]  # a short file: let zarr decide (it raises on corruption)


def write_rows(arr, start: int, values: np.ndarray) -> None:
    """Write one whole row chunk starting at ``start``, atomically (tmp file + rename).

    Raw chunks are written as their bytes; uncompressed string chunks through numcodecs'
    VLenUTF8 (the codec zarr itself runs), skipping zarr's per-chunk machinery. Other arrays
    go through zarr, which is told to write chunks equal to the fill value too, so a missing
    chunk always means lost data.
    """
    rows = arr.chunks[0]
    layout = raw_layout(arr) if start % rows == 0 else None
    if layout is None:
        arr.with_config({"write_empty_chunks": True})[start : start + len(values)] = values
        return
    if layout == "vlen-utf8":
        from numcodecs import VLenUTF8

        full = np.full(rows, arr.metadata.fill_value, dtype=object)  # edge chunks are stored full-size
        full[: len(values)] = values
        data = memoryview(VLenUTF8().encode(full))
    else:
        full = values
        if len(values) != rows or not values.flags.c_contiguous or values.dtype != arr.dtype:
            full = np.zeros((rows,) + arr.shape[1:], dtype=arr.dtype)
            full[: len(values)] = values
        data = memoryview(full).cast("B")
    path = chunk_file(arr, start // rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)  # a killed writer's leftover is removed by the next (backbench.store.cleanup)
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def as_crc(value: Any) -> int:
    """A stored checksum (int, or schema-1 hex string) as an int; -1 for not done."""
    if isinstance(value, str):
        return int(value, 16) if value else -1
    return int(value)
