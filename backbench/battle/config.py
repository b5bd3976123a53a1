"""Battle configuration: backbones × datasets × tasks, from TOML (or the built-in default)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbench.errors import BackbenchError

TASKS = ("probe", "fewshot", "knn", "retrieval", "ood", "shift")

DEFAULT_TOML = """
# The built-in battle: offline-ready pretrained EfficientNet-Lite backbones and random-init
# baselines on scikit-learn's bundled digits, every task. `backbench battle` runs it.
cache = "battle.zarr"
backbones = [
  "timm:tf_efficientnet_lite0@local",
  "timm:tf_efficientnet_lite1@local",
  "timm:tf_efficientnet_lite2@local",
  "timm:tf_efficientnet_lite0@random",
]

[datasets.digits]
source = "digits"
splits = ["train", "test", "shifted"]
limit = 400          # the first 400 images of each split keep the demo to minutes on 2 CPU cores

[datasets.textures]
source = "textures"
splits = ["test"]
role = "ood"         # only an out-of-distribution set: no tasks of its own

[tasks.probe]
[tasks.fewshot]
shots = [1, 2, 4, 8, 16]
seeds = 3
[tasks.knn]
k = [10, 20]
[tasks.retrieval]
ks = [1, 5, 10]
[tasks.ood]
ood = ["textures:test"]
open_set = ["8", "9"]
[tasks.shift]
shifted = ["digits:shifted"]
"""


class ConfigError(BackbenchError, ValueError):
    """A battle config that cannot be run as written."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its splits (name -> data source), their roles, an optional row limit."""

    name: str
    splits: dict[str, str]
    train: str = "train"
    eval: str = "test"
    val: str | None = None
    role: str = "main"  # "main" gets every task; "ood" is only an OOD/shifted set
    limit: int | None = None


@dataclass(frozen=True)
class BattleConfig:
    backbones: list[str]
    datasets: dict[str, DatasetSpec]
    tasks: dict[str, dict[str, Any]]
    cache: str | None = None
    device: str = "auto"
    batch_size: int | None = None  # None: 256 on CUDA, 64 on CPU
    workers: int | None = None
    source: str = "built-in default"
    shards: int = 1  # extraction cells per split (whole chunks each): one per GPU worker on a cluster
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def main_datasets(self) -> list[DatasetSpec]:
        return [d for d in self.datasets.values() if d.role == "main"]


def _dataset(name: str, raw: dict[str, Any]) -> DatasetSpec:
    unknown = set(raw) - {"source", "splits", "train", "eval", "val", "role", "limit"}
    if unknown:
        raise ConfigError(f"datasets.{name}: unknown key(s) {', '.join(sorted(unknown))}")
    splits_raw = raw.get("splits")
    if isinstance(splits_raw, list):
        if "source" not in raw:
            raise ConfigError(f"datasets.{name}: a list of splits needs `source` (e.g. source = \"digits\")")
        splits = {str(s): str(raw["source"]) for s in splits_raw}
    elif isinstance(splits_raw, dict):
        splits = {str(k): str(v) for k, v in splits_raw.items()}
    else:
        raise ConfigError(f"datasets.{name}: `splits` must be a list of names or a table name = \"SOURCE\"")
    role = raw.get("role", "main")
    if role not in ("main", "ood"):
        raise ConfigError(f"datasets.{name}: role must be \"main\" or \"ood\", not {role!r}")
    spec = DatasetSpec(name, splits, str(raw.get("train", "train")), str(raw.get("eval", "test")),
                       raw.get("val"), role, raw.get("limit"))
    if role == "main":
        for r in ("train", "eval"):
            if getattr(spec, r) not in splits:
                raise ConfigError(f"datasets.{name}: {r} split {getattr(spec, r)!r} is not among its splits "
                                  f"({', '.join(splits)})")
    return spec


def parse_config(raw: dict[str, Any], source: str = "config") -> BattleConfig:
    """Validate a parsed TOML document; every error names the key to fix."""
    backbones = raw.get("backbones")
    if not isinstance(backbones, list) or not backbones or not all(isinstance(b, str) for b in backbones):
        raise ConfigError(f"{source}: `backbones` must be a non-empty list of names like \"timm:resnet18@random\"")
    for b in backbones:  # NAME#KIND ranks a feature kind of NAME as its own row
        kind = b.partition("#")[2]
        if kind:
            from backbench.extract.kinds import parse_kind

            try:
                parse_kind(kind)
            except Exception as exc:
                raise ConfigError(f"{source}: backbone {b!r}: {exc}") from None
    datasets = raw.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError(f"{source}: add at least one [datasets.NAME] table")
    tasks = raw.get("tasks", {name: {} for name in TASKS})
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ConfigError(f"{source}: unknown task(s) {', '.join(sorted(unknown))}; tasks are {', '.join(TASKS)}")
    parsed = {n: _dataset(n, d) for n, d in datasets.items()}
    for task in ("ood", "shift"):
        key = "ood" if task == "ood" else "shifted"
        for ref in tasks.get(task, {}).get(key, []):
            ds, _, split = str(ref).partition(":")
            if ds not in parsed or split not in parsed[ds].splits:
                raise ConfigError(f"{source}: tasks.{task}.{key} names {ref!r}, which is no DATASET:SPLIT of the config")
    known = {"backbones", "datasets", "tasks", "cache", "device", "batch_size", "workers", "shards"}
    if set(raw) - known:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(set(raw) - known))}")
    return BattleConfig(list(backbones), parsed, {k: dict(v) for k, v in tasks.items()}, raw.get("cache"),
                        raw.get("device", "auto"), raw.get("batch_size"), raw.get("workers"), source,
                        shards=_positive(raw.get("shards", 1), f"{source}: shards"))


def _positive(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def load_config(path: str | Path | None = None) -> BattleConfig:
    """Read a TOML config, or the built-in default when ``path`` is None."""
    if path is None:
        return parse_config(tomllib.loads(DEFAULT_TOML), "built-in default")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"battle config {str(p)!r} does not exist; run `backbench battle` with no config for the default")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(raw, str(p))
