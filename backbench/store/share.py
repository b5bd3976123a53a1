"""Move groups between caches: ``pack`` chosen groups (with their results) into a zip,
``unpack`` one into a cache, refusing unsafe archives and verifying every chunk.

An archive is untrusted input: members with absolute paths, ``..`` or links are refused
before anything is written, everything lands in a staging folder first, and only groups
whose checksums verify are moved into the cache.
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from backbench.errors import CacheError, CacheMismatch
from backbench.store.cache import RESULTS, Cache
from backbench.store.verify import verify

MANIFEST = "backbench-pack.json"
_GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})


def _local_root(cache: Cache) -> Path:
    if "://" in cache.path and not cache.path.startswith("file://"):
        raise CacheError("pack and unpack work on local caches; copy remote ones with fsspec first")
    return Path(cache.path.removeprefix("file://"))


def pack(cache: Cache, groups: list[str], target: str | Path) -> dict:
    """Zip the given group paths (as in ``backbench ls --json``), the root metadata and the
    results records that read only these groups."""
    root = _local_root(cache)
    held = {g.path: g for g in cache.groups()}
    missing = [g for g in groups if g.strip("/") not in held]
    if missing:
        raise CacheError(f"no group {missing[0]!r} in {cache.path}; see `backbench ls --json` for group paths")
    chosen = {held[g.strip("/")] for g in groups} if groups else set(held.values())
    keys = {g.attrs["cache_key"] for g in chosen}
    records = [r for r in (dict(n.attrs) for _, n in _results(cache)) if set(r.get("groups", {}).values()) <= keys]
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(root / "zarr.json", "zarr.json")
        parents = sorted({p for g in chosen for p in _parents(g.path) if (root / p / "zarr.json").exists()})
        for parent in parents:
            zf.write(root / parent / "zarr.json", f"{parent}/zarr.json")
        for group in sorted(chosen, key=lambda g: g.path):
            for f in sorted((root / group.path).rglob("*")):
                if f.is_file() and not f.name.endswith(".partial"):
                    zf.write(f, f.relative_to(root).as_posix())
        if records:
            zf.writestr(f"{RESULTS}/zarr.json", _GROUP_JSON)
        for r in records:
            zf.writestr(f"{RESULTS}/{r['key']}/zarr.json", json.dumps(
                {"zarr_format": 3, "node_type": "group", "attributes": r}))
        manifest = {"groups": sorted(g.path for g in chosen), "records": len(records)}
        zf.writestr(MANIFEST, json.dumps(manifest))
    return manifest


def _results(cache: Cache):
    try:
        return list(cache.root[RESULTS].groups())
    except KeyError:
        return []


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


def unpack(archive: str | Path, cache: Cache) -> dict:
    """Unpack into ``cache``: verify every chunk, refuse groups that conflict, keep the rest intact."""
    root = _local_root(cache)
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CacheError(f"{str(archive)!r} is not a backbench pack (zip): {exc}") from None
    with zf, tempfile.TemporaryDirectory(dir=root.parent, prefix=".unpack-") as tmp:
        names = [_check_member(i) for i in zf.infolist()]
        if MANIFEST not in names:
            raise CacheError(f"{str(archive)!r} has no {MANIFEST}; make packs with `backbench pack`")
        bad = zf.testzip()
        if bad is not None:
            raise CacheError(f"archive member {bad!r} is corrupt (CRC mismatch); nothing was unpacked")
        for info, name in zip(zf.infolist(), names):
            if not info.is_dir() and name != MANIFEST:
                target = Path(tmp, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        manifest = json.loads(zf.read(MANIFEST))
        staged = Cache(tmp, mode="r")
        problems, checked = verify(staged)
        if problems:
            raise CacheError(f"pack fails verification at {problems[0]['group']} chunk {problems[0]['chunk']}: "
                             f"{problems[0]['detail']}; nothing was unpacked")
        _refuse_conflicts(staged, cache)
        for group in manifest["groups"]:
            _move_group(Path(tmp), root, group)
            cache._add_to_index(group)  # listed for stores that cannot list (served over HTTP)
        staged_results = Path(tmp, RESULTS)
        for record in sorted(p for p in staged_results.glob("*") if p.is_dir()):
            if not (root / RESULTS / record.name).exists():
                (root / RESULTS).mkdir(parents=True, exist_ok=True)
                if not (root / RESULTS / "zarr.json").exists():
                    (root / RESULTS / "zarr.json").write_text(_GROUP_JSON)
                shutil.move(str(record), root / RESULTS / record.name)
    return {**manifest, "chunks_verified": checked}


def _refuse_conflicts(staged: Cache, cache: Cache) -> None:
    held = {g.path: g.attrs.get("cache_key") for g in cache.groups()}
    for g in staged.groups():
        if g.path in held and held[g.path] != g.attrs.get("cache_key"):
            raise CacheMismatch(f"{g.path} exists in {cache.path} with other contents (cache_key differs); "
                                f"nothing was unpacked")


def _move_group(tmp: Path, root: Path, group: str) -> None:
    """Move one verified group into place (parents' zarr.json too); an identical one stays."""
    for parent in _parents(group):
        if not (root / parent / "zarr.json").exists():
            (root / parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp / parent / "zarr.json", root / parent / "zarr.json")
    if not (root / group).exists():
        shutil.move(str(tmp / group), root / group)
