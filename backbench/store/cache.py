"""The Zarr feature cache: one store, one group per (backbone, dataset, split).

Layout (all readable with plain ``zarr.open_group(path, mode="r")``)::

    features.zarr/
      zarr.json                      attrs: backbench schema version
      <backbone-slug>/<dataset>/<split>/
        features       (sample, feature)  float16|float32, chunked by rows, uncompressed
        labels         (sample,)          int64
        ids            (sample,)          string
        logits         (sample, class)    optional, the backbone's own classifier
        chunk_checksum (chunk,)           int64: -1 until that row chunk is written, then its CRC-32
      _results/<key>/                    one group per results record, the record in its attrs
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterator


from backbench.errors import CacheError, GroupNotFound
from backbench.store.group import FeatureGroup

SCHEMA_VERSION = 2  # 2: int64 chunk checksums, raw labels (schema 1 caches still read)
RESULTS = "_results"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def default_cache_path(cache: str | os.PathLike | None = None) -> str:
    """``--cache``, else ``$BACKBENCH_CACHE``, else ``./features.zarr``."""
    return str(cache or os.environ.get("BACKBENCH_CACHE") or "features.zarr")


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value or ""):
        raise CacheError(f"{kind} name {value!r} must be letters, digits and . _ + - (e.g. cifar10, train)")
    return value


def backbone_slug(name: str) -> str:
    """A folder name for a backbone; weights paths become their stem plus a short hash."""
    core, at, weights = name.partition("@")
    slug = re.sub(r"[^A-Za-z0-9._+~-]", "_", core.replace(":", "~").replace("/", "~"))
    if at:
        if re.match(r"^[A-Za-z0-9._+-]+$", weights) and "/" not in weights:
            slug += f"@{weights}"
        else:
            stem = re.sub(r"[^A-Za-z0-9._+-]", "_", Path(weights).stem)[:40]
            slug += f"@{stem}-{hashlib.sha256(weights.encode()).hexdigest()[:8]}"
    return slug


class Cache:
    """A feature cache at a local path (or, via zarr's fsspec store, a URL).

    ``mode``: "a" creates the cache if needed (extraction), "r+" needs it to exist (probes,
    which write results), "r" reads only.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, mode: str = "a") -> None:
        import zarr

        self.path = default_cache_path(path)
        local = Path(self.path)
        if "://" not in self.path:
            if local.exists() and not local.is_dir():
                raise CacheError(f"cache path {self.path!r} is a file; give a folder such as features.zarr")
            if mode in ("r", "r+") and not (local / "zarr.json").exists():
                raise CacheError(
                    f"no feature cache at {self.path!r}; run `backbench extract` first or pass --cache"
                )
        try:
            self.root = zarr.open_group(self.path, mode=mode)
        except Exception as exc:
            raise CacheError(f"cannot open cache {self.path!r}: {type(exc).__name__}: {exc}") from exc
        version = self.root.attrs.get("backbench_schema_version")
        if version is None and mode != "r":
            self.root.attrs.update({"backbench_schema_version": SCHEMA_VERSION, "backbench": "feature cache"})
        elif version is not None and int(version) > SCHEMA_VERSION:
            raise CacheError(
                f"cache {self.path!r} was written by a newer backbench (schema {version} > {SCHEMA_VERSION}); "
                f"upgrade backbench"
            )
        self.mode = mode

    def group_path(self, backbone: str, dataset: str, split: str) -> str:
        return f"{backbone_slug(backbone)}/{check_name('dataset', dataset)}/{check_name('split', split)}"

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        try:
            self.root[self.group_path(*key)]
        except KeyError:
            return False
        return True

    def group(self, backbone: str, dataset: str, split: str) -> FeatureGroup:
        """Open an existing group; unknown keys list what the cache holds."""
        try:
            node = self.root[self.group_path(backbone, dataset, split)]
        except KeyError:
            raise GroupNotFound(self._missing_message(backbone, dataset, split)) from None
        return FeatureGroup(node)

    def _missing_message(self, backbone: str, dataset: str, split: str) -> str:
        held = [g for g in self.groups() if g.backbone == backbone and g.dataset == dataset]
        if held:
            splits = ", ".join(sorted(g.split for g in held))
            return f"cache {self.path!r} has no split {split!r} of {dataset} for {backbone} (has: {splits})"
        return (
            f"cache {self.path!r} has no features for {backbone} on {dataset}/{split}; "
            f"run `backbench extract {backbone} --dataset {dataset} --split {split} --data ...` "
            f"or see `backbench ls`"
        )

    def create_group(self, backbone: str, dataset: str, split: str, **spec: Any) -> FeatureGroup:
        """Create (or replace) a group with its arrays and provenance; see :meth:`FeatureGroup.create`."""
        return FeatureGroup.create(self.root, self.group_path(backbone, dataset, split), **spec)

    def groups(self) -> Iterator[FeatureGroup]:
        """Every feature group, walked three levels deep (never into the results log)."""
        for _, b in sorted(self.root.groups()):
            if b.basename == RESULTS:
                continue
            for _, d in sorted(b.groups()):
                for _, s in sorted(d.groups()):
                    if "backbone" in s.attrs:
                        yield FeatureGroup(s)


