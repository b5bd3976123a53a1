"""The cached text embeddings' groups (``_text/<backbone-slug>/<hash>``) as pack, merge and export
see them: found, checked whole, and told apart from feature groups.

They are written by :mod:`backbench.extract.text` (zero-shot prompts, captions) with the arrays
and chunk checksums of a feature group, outside the ``backbone/dataset/split`` tree that
:meth:`Cache.groups` walks, and are not in the root's group index: a reader opens one by its
path. Carrying them with the image groups and the records that read them lets a copied cache
answer zero-shot and text retrieval without loading the text tower again.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from backbench.errors import CacheError
from backbench.store.cache import Cache, backbone_slug
from backbench.store.group import FeatureGroup

TEXT = "_text"  # the text groups' folder at the cache's root


def is_text_path(path: str) -> bool:
    """Whether ``path`` names a text group's place (``_text/<slug>/<hash>``)."""
    return path.strip("/").split("/")[0] == TEXT


def text_path(attrs: dict[str, Any]) -> str:
    """Where a text group with these attributes lives: ``_text/<backbone-slug>/<split>`` (the hash)."""
    return f"{TEXT}/{backbone_slug(str(attrs['backbone']))}/{attrs['split']}"


def is_text_group(attrs: dict[str, Any]) -> bool:
    return attrs.get("backbench_kind") == "text" or attrs.get("dataset") == TEXT


def text_groups(cache: Cache) -> Iterator[FeatureGroup]:
    """Every readable text group of ``cache``: none where the store cannot list ``_text``, and
    none whose metadata cannot be read (it is recomputed where it is needed, never copied)."""
    for path in _text_paths(cache):
        try:
            node = cache.root[path]
        except Exception:  # noqa: BLE001 - unreadable metadata
            continue
        if "backbone" in node.attrs:
            yield FeatureGroup(node)


def _text_paths(cache: Cache) -> list[str]:
    """``_text/<slug>/<hash>`` of every folder there: by the file system for a local cache (one
    unreadable group hides no other), else by the store's listing."""
    local = cache.location.local_path
    if local is not None:
        top = local / TEXT
        return sorted(f"{TEXT}/{b.name}/{g.name}" for b in (top.iterdir() if top.is_dir() else [])
                      if b.is_dir() for g in b.iterdir() if (g / "zarr.json").is_file())
    try:
        return sorted(f"{TEXT}/{b}/{g}" for b, node in cache.root[TEXT].groups() for g, _ in node.groups())
    except Exception:  # noqa: BLE001 - no _text folder, or a store that cannot list it
        return []


def text_problem(group: FeatureGroup) -> str | None:
    """What makes a text group unfit to copy (torn, damaged, in the wrong place), or None: its
    structure, every chunk's checksum marker, and every chunk's data against its checksum."""
    try:
        group.check()
        if group.path != text_path(group.attrs):
            return f"its attributes name another place ({text_path(group.attrs)})"
        stored = group.stored_checksums()
        if (stored < 0).any():
            return f"torn: {group.rows_done()} of {group.n} rows have a checksum"
        group.check_files(stored)
        for chunk in range(group.n_chunks):
            group.read_chunk(chunk)
    except (CacheError, KeyError) as exc:
        detail = str(exc).split(": ", 1)[-1].split("; ")[0]
        return f"damaged: {detail}"
    return None


def refuse_torn(groups: Iterable[FeatureGroup], where: str, nothing: str) -> None:
    """Refuse, in one line, the first text group that :func:`text_problem` finds unfit."""
    for group in groups:
        problem = text_problem(group)
        if problem:
            raise CacheError(f"text embeddings {group.path} in {where} are {problem}; run the zeroshot or "
                             f"`retrieve --text` that made them again (they are recomputed) or delete that "
                             f"folder; {nothing}")


def held_text(cache: Cache, attrs: dict[str, Any]) -> tuple[str, FeatureGroup | None]:
    """Where a text group with ``attrs`` goes in ``cache``, and the group there now (None if none)."""
    path = text_path(attrs)
    try:
        return path, FeatureGroup(cache.root[path]).check()
    except KeyError:
        return path, None


def check_imported(where: str, name: str, attrs: dict[str, Any], stored: np.ndarray | None) -> None:
    """Refuse a text group of an exported file (``where``, at ``name``) that is torn or at another
    place than its attributes name (its chunks are checked against their checksums as they are copied)."""
    if name != text_path(attrs):
        raise CacheError(f"{where}: text group {name} names another place ({text_path(attrs)}); export it again; "
                         f"nothing was imported")
    if stored is None or (stored < 0).any():
        raise CacheError(f"{where}: text embeddings {name} are torn (chunks without a checksum); export them "
                         f"again from a cache where they are whole; nothing was imported")


def keys_of(groups: Iterable[FeatureGroup]) -> dict[str, FeatureGroup]:
    """The groups by ``cache_key``."""
    return {g.attrs.get("cache_key"): g for g in groups}


def named_by(records: Iterable[dict[str, Any]], texts: dict[str, FeatureGroup]) -> list[FeatureGroup]:
    """The text groups (of ``texts``, by cache key) that ``records`` read."""
    keys = {k for r in records for k in (r.get("groups") or {}).values()}
    return [g for k, g in texts.items() if k in keys]


def layout(group: FeatureGroup) -> tuple[int, int, str]:
    return group.n, group.dim, group.dtype


def copy_text(target: Cache, source: FeatureGroup) -> FeatureGroup:
    """Copy a checked text group into ``target`` at its own path (arrays, attributes, checksums:
    every chunk read is checked against its source's checksum, and the copy's against it)."""
    a = source.attrs
    group = FeatureGroup.create(target.root, source.path, n=source.n, dim=source.dim, dtype=source.dtype,
                                chunk_rows=source.chunk_rows, attrs=a)
    if group.attrs["cache_key"] != a.get("cache_key"):
        raise CacheError(f"{source.path}: its cache_key does not match its provenance attributes (edited); "
                         f"nothing of it was copied")
    X, y = source.read_labeled()
    ids = np.asarray(source.read("ids"), dtype=object).astype(str)
    group.write_rows(0, X, y, list(ids))
    if not np.array_equal(group.stored_checksums(), source.stored_checksums()):
        raise CacheError(f"{source.path}: the copy's checksums differ from its source's; check the disk and "
                         f"rerun")
    group.finalize()
    return group
