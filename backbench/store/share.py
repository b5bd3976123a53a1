"""Move groups between caches: ``pack`` chosen groups (with their results) into a zip,
``unpack`` one into a cache, refusing unsafe archives and verifying every chunk.

An archive is untrusted input: members with absolute paths, ``..`` or links are refused
before anything is written, everything lands in a staging folder first, and only groups
whose checksums verify are moved into the cache. The text embeddings that the packed records
read (``_text/...`` groups, :mod:`backbench.store.text_groups`) travel with them, checked the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

from backbench.errors import CacheError, CacheMismatch, IncompleteGroup
from backbench.store.cache import Cache, default_cache_path
from backbench.store.cleanup import clean_partials, clean_staging, partial_name, staging_dir
from backbench.store.group import group_key
from backbench.store.location import Location
from backbench.store.lock import group_locked
from backbench.store.results import results_groups
from backbench.store.structure import RESULTS, group_path_ok
from backbench.store.text_groups import (is_text_group, is_text_path, keys_of, named_by, refuse_torn, text_groups,
                                         text_problem)
from backbench.store.verify import incomplete, refuse_damaged, verify

MANIFEST = "backbench-pack.json"
EXPANSION = 10  # a pack may unpack to at most this many times its size unless --max-size says more
COPY_BLOCK = 1 << 20
_GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})


def _local_root(cache: Cache | str | os.PathLike | None) -> Path:
    """The local folder of a cache (opened, or by path); pack and unpack refuse URLs."""
    where = cache.location if isinstance(cache, Cache) else Location.of(default_cache_path(cache))
    if where.local_path is None:
        raise CacheError("pack and unpack work on local caches; copy remote ones with fsspec first")
    return where.local_path


def pack(cache: Cache, groups: list[str], target: str | Path) -> dict:
    """Zip the given group paths (as in ``backbench ls --json``; all of them when none are
    given), the root metadata, the results records that read only these groups (and text
    embeddings), and the text embeddings those records read (``_text/...`` paths may be given too).

    The zip is written under a temporary name beside ``target`` and renamed when whole, so
    ``target`` is never a truncated zip; leftovers of killed runs are removed first.
    """
    root, target = _local_root(cache), Path(target)
    if not groups:
        refuse_damaged(cache)
    held, texts = {g.path: g for g in cache.groups()}, {g.path: g for g in text_groups(cache)}
    names = [g.strip("/") for g in groups]
    missing = [g for g in names if g not in held and g not in texts]
    if missing:
        raise CacheError(f"no group {missing[0]!r} in {cache.path}; see `backbench ls --json` for group paths")
    chosen = {held[g] for g in names if g in held} if groups else set(held.values())
    for g in chosen:  # a pack holds whole, readable groups only (unpack refuses anything else)
        if not g.check().check_files().is_complete:
            raise IncompleteGroup(f"group {g.path} is incomplete ({g.rows_done()} of {g.n} rows); finish it with "
                                  f"`backbench extract` before packing it (or merge caches instead)")
    keys, text_keys = {g.attrs["cache_key"] for g in chosen}, keys_of(texts.values())
    records = [r for r in (dict(n.attrs) for _, n in results_groups(cache))
               if set(r.get("groups", {}).values()) - set(text_keys) <= keys]
    carried = {g.path: g for g in named_by(records, text_keys)}
    carried.update({p: texts[p] for p in (names if groups else texts) if p in texts})
    refuse_torn(carried.values(), cache.path, "nothing was packed")
    manifest = {"groups": sorted(g.path for g in chosen), "records": len(records), "text": sorted(carried)}
    clean_partials(target.parent, recursive=False, name=target.name)
    tmp = partial_name(target)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf, ExitStack() as locks:
            every = sorted([*chosen, *carried.values()], key=lambda g: g.path)
            for g in every:  # no extraction, overwrite, merge or text embedding while zipping
                locks.enter_context(group_locked(cache.path, g.path, shared=True))
            _write_pack(zf, root, every, records, manifest)
        os.replace(tmp, target)
    except OSError as exc:
        raise CacheError(f"cannot write {str(target)!r}: {exc.strerror or exc}; nothing was written") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def _write_pack(zf: zipfile.ZipFile, root: Path, chosen: list, records: list[dict], manifest: dict) -> None:
    zf.write(root / "zarr.json", "zarr.json")
    parents = sorted({p for g in chosen for p in _parents(g.path) if (root / p / "zarr.json").exists()})
    for parent in parents:
        zf.write(root / parent / "zarr.json", f"{parent}/zarr.json")
    for group in chosen:
        for f in sorted((root / group.path).rglob("*")):
            if f.is_file() and not f.name.endswith(".partial"):
                zf.write(f, f.relative_to(root).as_posix())
    if records:
        zf.writestr(f"{RESULTS}/zarr.json", _GROUP_JSON)
    for r in records:
        zf.writestr(f"{RESULTS}/{r['key']}/zarr.json", json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": r}))
        for f in sorted((root / RESULTS / r["key"]).rglob("*")):  # its outcome arrays, if any
            if f.is_file() and f.parent != root / RESULTS / r["key"] and not f.name.endswith(".partial"):
                zf.write(f, f.relative_to(root).as_posix())
    zf.writestr(MANIFEST, json.dumps(manifest))


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _check_member(info: zipfile.ZipInfo) -> str:
    """The member's safe relative path, or an error naming what is wrong with it."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise CacheError(f"archive member {name!r} is a link; refusing to unpack")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise CacheError(f"archive member {name!r} has an absolute path; refusing to unpack")
    if ".." in p.parts or "\\" in name:
        raise CacheError(f"archive member {name!r} points outside the cache; refusing to unpack")
    return p.as_posix()


def unpack(archive: str | Path, cache: Cache | str | os.PathLike | None, *, max_size: int | None = None) -> dict:
    """Unpack into ``cache`` (a Cache, or a path created only once the pack checks out): verify
    every chunk, refuse groups that conflict, keep the rest intact.

    Nothing is moved into the cache until the whole pack is checked: its members (no links,
    absolute paths or ``..``), its manifest (every group a safe path that the zip holds), its
    size (at most ``max_size`` bytes unpacked, default 10x the zip's size, and the free disk),
    its CRCs and its chunk checksums. Unpacking happens in a staging folder beside the cache,
    removed afterwards; one left by a killed unpack is removed by the next unpack or write.
    """
    target = cache if isinstance(cache, Cache) else None
    root = _local_root(cache) if target is not None else _local_path(cache)
    zf = _open_pack(archive)
    with zf:
        names = [_check_member(i) for i in zf.infolist()]
        manifest = _read_manifest(zf, names, archive)
        limit = _check_size(zf, archive, root, max_size)
        bad = zf.testzip()
        if bad is not None:
            raise CacheError(f"archive member {bad!r} is corrupt (CRC mismatch); nothing was unpacked")
        clean_staging(root)
        tmp = staging_dir(root)
        try:
            _extract(zf, names, tmp, limit, archive)
            staged = Cache(str(tmp), mode="r")
            checked = _check_staged(staged, manifest)
            if target is None and (root / "zarr.json").exists():
                target = Cache(str(root))
            if target is not None:
                _refuse_conflicts(staged, target)
            _move_all(tmp, root, target, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "chunks_verified": checked}


def _local_path(path: str | os.PathLike | None) -> Path:
    local = _local_root(path)
    if local.exists() and not local.is_dir():
        raise CacheError(f"cache path {default_cache_path(path)!r} is a file; give a folder such as features.zarr")
    return local


def _open_pack(archive: str | Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CacheError(f"{str(archive)!r} is not a backbench pack (zip): {exc}") from None


def _read_manifest(zf: zipfile.ZipFile, names: list[str], archive: str | Path) -> dict:
    """The manifest, checked whole: every group a safe relative path that the pack holds."""
    if MANIFEST not in names:
        raise CacheError(f"{str(archive)!r} has no {MANIFEST}; make packs with `backbench pack`")
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"{str(archive)!r}: its {MANIFEST} is not valid JSON ({exc}); nothing was unpacked") from None
    groups = manifest.get("groups") if isinstance(manifest, dict) else None
    records = manifest.get("records", 0) if isinstance(manifest, dict) else None
    texts = manifest.get("text", []) if isinstance(manifest, dict) else None
    if not isinstance(groups, list) or not isinstance(records, int) or not isinstance(texts, list):
        raise CacheError(f"{str(archive)!r}: its {MANIFEST} must be {{\"groups\": [group paths], \"records\": N, "
                         f"\"text\": [text group paths]}}; nothing was unpacked")
    held = set(names)
    for g in [*groups, *texts]:
        if not isinstance(g, str) or group_path_ok(g) is None or is_text_path(g) != (g in texts):
            raise CacheError(f"{str(archive)!r}: its manifest names {g!r}, not a group path inside a cache "
                             f"(backbone/dataset/split, no '..', leading '/', '\\' or empty parts); "
                             f"nothing was unpacked")
        if f"{g}/zarr.json" not in held:
            raise CacheError(f"{str(archive)!r}: its manifest names group {g!r}, which the pack does not hold; "
                             f"nothing was unpacked")
    if "zarr.json" not in held:
        raise CacheError(f"{str(archive)!r} has no root zarr.json; make packs with `backbench pack`")
    return {"groups": sorted(set(groups)), "records": records, "text": sorted(set(texts))}


def _check_size(zf: zipfile.ZipFile, archive: str | Path, root: Path, max_size: int | None) -> int:
    """Refuse a pack whose members would unpack past ``max_size`` (default 10x the zip's size) or
    past the free disk; returns the byte limit the unpacking itself then holds to."""
    declared = sum(i.file_size for i in zf.infolist())
    limit = max_size if max_size is not None else EXPANSION * os.path.getsize(archive)
    if declared > limit:
        how = "--max-size" if max_size is not None else f"{EXPANSION}x the pack's size; raise it with --max-size"
        raise CacheError(f"{str(archive)!r} would unpack to {_mb(declared)}, more than the limit of {_mb(limit)} "
                         f"({how}); nothing was written")
    where = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if declared > free:
        raise CacheError(f"{str(archive)!r} would unpack to {_mb(declared)}, more than the {_mb(free)} free on "
                         f"the disk of {str(root)!r}; nothing was written")
    return min(limit, declared)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _extract(zf: zipfile.ZipFile, names: list[str], tmp: Path, limit: int, archive: str | Path) -> None:
    """Every member but the manifest into ``tmp``; more bytes than the members declared is refused."""
    written = 0
    try:
        for info, name in zip(zf.infolist(), names):
            if info.is_dir() or name == MANIFEST:
                continue
            target = Path(tmp, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                while block := src.read(COPY_BLOCK):
                    written += len(block)
                    if written > limit:
                        raise CacheError(f"{str(archive)!r} unpacks to more than its members declare; "
                                         f"nothing was unpacked")
                    dst.write(block)
    except OSError as exc:
        raise CacheError(f"cannot unpack {str(archive)!r} beside {tmp.parent}: {exc.strerror or exc}; "
                         f"nothing was unpacked") from exc


def _check_staged(staged: Cache, manifest: dict) -> int:
    """Chunks verified in the staged pack; each named group must be a feature group at its own path."""
    found = {g.path: g for g in staged.groups()}
    for path in manifest["groups"]:
        group = found.get(path)
        if group is None:
            raise CacheError(f"pack entry {path!r} is not a feature group (no backbone attributes); "
                             f"nothing was unpacked")
        try:
            where = staged.group_path(*group_key(group.attrs))
        except (KeyError, CacheError):
            where = None
        if where != path:
            raise CacheError(f"pack group {path!r}: its attributes name another group ({where}); "
                             f"nothing was unpacked")
    problems, checked = verify(staged)
    problems += [{"group": g["group"], "chunk": None, "detail": f"incomplete ({g['rows_done']} of {g['n']} rows "
                  f"have a checksum)"} for g in incomplete(staged)]
    if problems:
        first = problems[0]
        where = first["group"] + (f" chunk {first['chunk']}" if first.get("chunk") is not None else "")
        raise CacheError(f"pack fails verification at {where}: {first['detail']}; nothing was unpacked")
    return checked + _check_staged_texts(staged, manifest["text"])


def _check_staged_texts(staged: Cache, paths: list[str]) -> int:
    """Chunks verified in the staged pack's text groups: each whole, at its own path, every chunk
    against its checksum."""
    found = {g.path: g for g in text_groups(staged)}
    for path in paths:
        group = found.get(path)
        if group is None or not is_text_group(group.attrs):
            raise CacheError(f"pack entry {path!r} is not a text embeddings group; nothing was unpacked")
        problem = text_problem(group)
        if problem:
            raise CacheError(f"pack fails verification at {path}: {problem}; nothing was unpacked")
    return sum(found[p].n_chunks for p in paths)


def _move_all(tmp: Path, root: Path, target: Cache | None, manifest: dict) -> None:
    """Move the verified groups and new records in; a cache created here and left empty goes again."""
    fresh = target is None
    if fresh:
        target = Cache(str(root))
    try:
        for group in manifest["groups"]:
            _move_group(tmp, root, group)
            target._add_to_index(group)  # listed for stores that cannot list (served over HTTP)
        for group in manifest["text"]:  # opened by path, never listed: not in the index
            _move_group(tmp, root, group)
        staged_results = Path(tmp, RESULTS)
        for record in sorted(p for p in staged_results.glob("*") if p.is_dir()):
            if not (root / RESULTS / record.name).exists():
                (root / RESULTS).mkdir(parents=True, exist_ok=True)
                if not (root / RESULTS / "zarr.json").exists():
                    (root / RESULTS / "zarr.json").write_text(_GROUP_JSON)
                shutil.move(str(record), root / RESULTS / record.name)
    except BaseException:
        if fresh and sorted(os.listdir(root)) == ["zarr.json"]:
            shutil.rmtree(root, ignore_errors=True)
        raise


def _refuse_conflicts(staged: Cache, cache: Cache) -> None:
    held = {g.path: g.attrs.get("cache_key") for g in [*cache.groups(), *text_groups(cache)]}
    for g in [*staged.groups(), *text_groups(staged)]:
        if g.path in held and held[g.path] != g.attrs.get("cache_key"):
            raise CacheMismatch(f"{g.path} exists in {cache.path} with other contents (cache_key differs); "
                                f"nothing was unpacked")


def _move_group(tmp: Path, root: Path, group: str) -> None:
    """Move one verified group into place (parents' zarr.json too); an identical one stays."""
    for parent in _parents(group):
        if not (root / parent / "zarr.json").exists():
            (root / parent).mkdir(parents=True, exist_ok=True)
            source = tmp / parent / "zarr.json"
            if source.exists():
                shutil.copy(source, root / parent / "zarr.json")
            else:
                (root / parent / "zarr.json").write_text(_GROUP_JSON)
    with group_locked(str(root), group):  # not while an extraction, overwrite or merge writes it
        if not (root / group).exists():
            shutil.move(str(tmp / group), root / group)
