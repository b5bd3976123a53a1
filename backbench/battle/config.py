"""Battle configuration: backbones × datasets × tasks, from TOML (or the built-in default)."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backbench.errors import BackbenchError
from backbench.tasks.base import POS_INT as _POS_INT
from backbench.tasks.base import Check, is_int, is_text


DEFAULT_TOML = """
# The built-in battle: offline-ready ImageNet-pretrained EfficientNet-Lite backbones and a
# random-init baseline on real photos shipped with backbench (cifar10-mini: 1,500 CIFAR-10
# images), every task. `backbench battle` runs it in about 8 minutes on 2 CPU cores.
cache = "battle.zarr"
backbones = [
  "timm:tf_efficientnet_lite0@local",
  "timm:tf_efficientnet_lite1@local",
  "timm:tf_efficientnet_lite0@random",
]

[datasets.cifar10-mini]
source = "cifar10-mini"
splits = ["train", "test", "shifted"]   # 1,000 / 500 / 500 images

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
open_set = ["ship", "truck"]
[tasks.shift]
shifted = ["cifar10-mini:shifted"]
[tasks.clustering]
"""


class ConfigError(BackbenchError, ValueError):
    """A battle config that cannot be run as written (a usage error: exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its splits (name -> data source), their roles, an optional row limit.
    ``train`` is None for a dataset with no train split: only tasks that evaluate alone (zero-shot,
    text retrieval, clustering: their ``roles`` lack "train") may run on it."""

    name: str
    splits: dict[str, str]
    train: str | None = "train"
    eval: str = "test"
    val: str | None = None
    role: str = "main"  # "main" gets its tasks; "ood" is only an OOD/shifted set
    limit: int | None = None
    tasks: tuple[str, ...] | None = None  # the tasks it gets; None: every image-level task of the config


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
    entries: list[tuple[str, str]] = field(default_factory=list)  # (backbone, feature kind) per row

    def __post_init__(self) -> None:
        if not self.entries:  # "NAME#KIND" in a config's list: NAME read with that feature kind, its own row
            rows = [(b.partition("#")[0], b.partition("#")[2] or "pooled") for b in self.backbones]
            object.__setattr__(self, "entries", rows)

    @property
    def main_datasets(self) -> list[DatasetSpec]:
        return [d for d in self.datasets.values() if d.role == "main"]

    def tasks_for(self, ds: DatasetSpec) -> list[str]:
        """The configured tasks ``ds`` gets: those its ``tasks`` names, else every task that is
        not dense (segmentation and detection run only on datasets that name them)."""
        from backbench.tasks.base import get_task

        if ds.role != "main":
            return []
        if ds.tasks is not None:
            return [t for t in self.tasks if t in ds.tasks]
        return [t for t in self.tasks if not get_task(t).dense]


def needs_train(task: str) -> bool:
    """Whether a task fits on a train split (a probe, kNN, ...); zero-shot, text retrieval and
    clustering only evaluate."""
    from backbench.tasks.base import get_task

    return "train" in get_task(task).roles


# ----------------------------------------------------------------------------- value checks
# (the tasks' own parameters are checked by their schemas: backbench.tasks.base.Task.check_params)
DEFAULT_TASKS = ("probe", "fewshot", "knn", "retrieval")  # no [tasks] table: those that need no inputs
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
TOP: dict[str, Check] = {
    "cache": (is_text, "a path or URL string, e.g. \"battle.zarr\""),
    "device": (lambda v: isinstance(v, str) and bool(_DEVICE.match(v)), "auto, cpu, cuda, cuda:N or mps"),
    "batch_size": _POS_INT,
    "workers": (lambda v: is_int(v, 0), "an integer >= 0 (0: decode in the main process)"),
    "shards": _POS_INT,
    "preset": (is_text, 'a preset name, e.g. "bob" (see `backbench models --preset bob`)'),
}
DATASET_KEYS = {"source", "splits", "train", "eval", "val", "role", "limit", "tasks"}


class _Problems(list):
    """Every problem of one config, each naming its key; raised together as one ConfigError."""

    def check(self, where: str, value: Any, check: Check) -> bool:
        ok = check[0](value)
        if not ok:
            self.append(f"{where} must be {check[1]}, not {value!r}")
        return ok

    def unknown(self, where: str, keys: Any, known: Any) -> None:
        extra = sorted(set(keys) - set(known))
        if extra:
            self.append(f"{where}unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(known)) or 'none'})")


# ----------------------------------------------------------------------------- sections


def _splits(name: str, raw: dict[str, Any], problems: _Problems) -> dict[str, str]:
    """``splits`` as {split: source}, each source parseable (nothing is opened)."""
    from backbench.extract.datasets import split_spec

    splits_raw, where = raw.get("splits"), f"datasets.{name}"
    if isinstance(splits_raw, list) and all(is_text(s) for s in splits_raw) and splits_raw:
        if not is_text(raw.get("source")):
            problems.append(f"{where}: a list of splits needs `source` (e.g. source = \"digits\")")
            return {}
        splits = {s: raw["source"] for s in splits_raw}
    elif isinstance(splits_raw, dict) and splits_raw and all(is_text(v) for v in splits_raw.values()):
        splits = dict(splits_raw)
    else:
        problems.append(f"{where}: `splits` must be a list of names or a table name = \"SOURCE\", "
                        f"not {splits_raw!r}")
        return {}
    named = {f"{where}.source": raw["source"]} if isinstance(splits_raw, list) else \
        {f"{where}.splits.{k}": v for k, v in splits.items()}
    for key, spec in named.items():
        try:
            split_spec(spec)
        except BackbenchError as exc:
            problems.append(f"{key}: {exc}")
    return splits


def _dataset(name: str, raw: Any, problems: _Problems) -> DatasetSpec | None:
    if not isinstance(raw, dict):
        problems.append(f"datasets.{name} must be a table ([datasets.{name}]), not {raw!r}")
        return None
    problems.unknown(f"datasets.{name}: ", raw, DATASET_KEYS)
    splits = _splits(name, raw, problems)
    role = raw.get("role", "main")
    if role not in ("main", "ood"):
        problems.append(f"datasets.{name}: role must be \"main\" or \"ood\", not {role!r}")
    if "limit" in raw:
        problems.check(f"datasets.{name}.limit", raw["limit"], (lambda v: is_int(v, 1), "a positive integer (rows)"))
    names = {r: raw.get(r, d) for r, d in (("train", "train"), ("eval", "test"), ("val", None))}
    if "train" not in raw and splits and "train" not in splits:
        names["train"] = None  # an eval-only dataset: the tasks that need a train split are refused or left out
    for r, split in names.items():
        needed = role == "main" and split is not None
        if needed and splits and split not in splits:
            problems.append(f"datasets.{name}: {r} split {split!r} is not among its splits ({', '.join(splits)})")
    tasks = raw.get("tasks")
    if tasks is not None and not (isinstance(tasks, list) and tasks and all(is_text(t) for t in tasks)):
        problems.append(f"datasets.{name}.tasks must be a non-empty list of task names, e.g. [\"segmentation\"], "
                        f"not {tasks!r}")
        tasks = None
    return DatasetSpec(name, splits, None if names["train"] is None else str(names["train"]), str(names["eval"]),
                       names["val"], role, raw.get("limit"), tuple(tasks) if tasks is not None else None)


def _check_eval_only(ds: DatasetSpec, tasks: dict[str, dict[str, Any]], problems: _Problems) -> None:
    """A dataset without a train split runs only tasks that need none: a task asked on it (named
    by its ``tasks``, or without that list every image-level task of the config) that needs a
    train split is a problem."""
    from backbench.tasks.base import get_task

    if ds.train is not None or ds.role != "main":
        return
    asked = [t for t in tasks if t in ds.tasks] if ds.tasks is not None else \
        [t for t in tasks if not get_task(t).dense]
    wrong = [t for t in asked if needs_train(t)]
    if not wrong:
        return
    fit = [t for t in asked if not needs_train(t)]
    example = "tasks = [" + ", ".join(f'"{t}"' for t in fit) + "]" if fit else 'tasks = ["zeroshot"]'
    what = (f"datasets.{ds.name}.tasks names {', '.join(wrong)}, which" if ds.tasks is not None else
            f"datasets.{ds.name} gets every task of the config, and {', '.join(wrong)}")
    problems.append(f"{what} need(s) a train split, which {ds.name} lacks (splits: {', '.join(ds.splits)}); add "
                    f"one, or give it only tasks that evaluate alone (zeroshot, text-retrieval, clustering), "
                    f"e.g. {example}")


def _with_preset(raw: dict[str, Any], problems: _Problems) -> tuple[Any, bool]:
    """(``backbones`` with each ``@PRESET`` item and a ``preset = "NAME"`` key expanded to the
    preset's names, the preset's first; whether it expanded): see :mod:`backbench.extract.backbones.zoo`."""
    from backbench.extract.backbones.zoo import PresetError, expand

    names, preset = raw.get("backbones"), raw.get("preset")
    if names is not None and not (isinstance(names, list) and all(isinstance(b, str) for b in names)):
        return names, True  # _backbones says what is wrong with it
    try:
        return expand(([f"@{preset}"] if is_text(preset) else []) + list(names or [])), True
    except PresetError as exc:
        problems.append(f"{'preset' if is_text(preset) else 'backbones'}: {exc}")
        return [], False


def _backbones(raw: Any, source: str, problems: _Problems) -> list[str]:
    """Each name resolvable by the backbone registry: source and model known (no weights loaded;
    a weights file that is missing fails its extraction cells, with its own message)."""
    if not isinstance(raw, list) or not raw or not all(isinstance(b, str) for b in raw):
        problems.append(f"{source}: `backbones` must be a non-empty list of names like \"timm:resnet18@random\" "
                        f"(or preset = \"bob\")")
        return []
    from backbench.errors import WeightsError
    from backbench.extract.backbones import resolve
    from backbench.kinds import parse_kind

    for i, b in enumerate(raw):
        name, _, kind = b.partition("#")  # NAME#KIND ranks a feature kind of NAME as its own row
        try:
            if kind:
                parse_kind(kind)
            resolve(name)
        except WeightsError:  # a weights file is the extraction cell's to find (a cluster may see it, we may not)
            continue
        except BackbenchError as exc:
            problems.append(f"backbones[{i}]: backbone {b!r}: {exc}")
    return list(raw)


def _tasks(raw: Any, datasets: dict[str, DatasetSpec], problems: _Problems) -> dict[str, dict[str, Any]]:
    """``[tasks.NAME]`` tables, each checked against its registered task's parameter schema."""
    from backbench.tasks.base import registered

    known = registered()
    if raw is None:
        return {t: {} for t in DEFAULT_TASKS}
    if not isinstance(raw, dict):
        problems.append(f"tasks must be a table of [tasks.NAME] sections (NAME one of {', '.join(known)}), "
                        f"not {raw!r}")
        return {}
    unknown = [t for t in raw if t not in known]
    if unknown:
        problems.append(f"unknown task(s) {', '.join(sorted(unknown))}; tasks are {', '.join(known)}")
    out = {}
    for name in (t for t in raw if t in known):
        params = raw[name]
        if not isinstance(params, dict):
            problems.append(f"tasks.{name} must be a table ([tasks.{name}]), not {params!r}")
            continue
        problems.extend(known[name].check_params(params, where=f"tasks.{name}")[1])
        for key in known[name].ref_params:
            _check_refs(name, key, params.get(key), datasets, problems)
        out[name] = dict(params)
    return out


def _check_refs(task: str, key: str, refs: Any, datasets: dict[str, DatasetSpec], problems: _Problems) -> None:
    for ref in refs if isinstance(refs, list) else []:
        ds, _, split = str(ref).partition(":")
        if ds not in datasets or split not in datasets[ds].splits:
            problems.append(f"tasks.{task}.{key} names {ref!r}, which is no DATASET:SPLIT of the config")


def parse_config(raw: dict[str, Any], source: str = "config") -> BattleConfig:
    """Validate a whole parsed TOML document; every problem is reported at once, each naming its key."""
    problems = _Problems()
    problems.unknown("", raw, {"backbones", "datasets", "tasks", *TOP})
    names, expanded = _with_preset(raw, problems)
    backbones = _backbones(names, source, problems) if expanded else []
    datasets_raw = raw.get("datasets")
    datasets: dict[str, DatasetSpec] = {}
    if not isinstance(datasets_raw, dict) or not datasets_raw:
        problems.append("add at least one [datasets.NAME] table")
    else:
        datasets = {n: d for n, v in datasets_raw.items() if (d := _dataset(n, v, problems)) is not None}
    tasks = _tasks(raw.get("tasks"), datasets, problems)
    for ds in datasets.values():
        for t in ds.tasks or ():
            if t not in tasks:
                problems.append(f"datasets.{ds.name}.tasks names {t!r}, which has no [tasks.{t}] table")
        _check_eval_only(ds, tasks, problems)
    for key, check in TOP.items():
        if key in raw:
            problems.check(key, raw[key], check)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))
    return BattleConfig(backbones, datasets, tasks, raw.get("cache"), raw.get("device", "auto"),
                        raw.get("batch_size"), raw.get("workers"), source, shards=raw.get("shards", 1))


def with_device(config: BattleConfig, device: str) -> BattleConfig:
    """``config`` with ``--device`` in place of its own (checked as the config's key is)."""
    problems = _Problems()
    if not problems.check("--device", device, TOP["device"]):
        raise ConfigError(problems[0])
    return replace(config, device=device)


DEFAULT_CACHE = "battle.zarr"


def resolve_cache(cli: str | None, config: BattleConfig) -> tuple[str, str]:
    """The cache a battle uses and why: ``--cache``, then ``$BACKBENCH_CACHE``, then the config's
    ``cache``, then ``battle.zarr`` (the order every command follows)."""
    env = os.environ.get("BACKBENCH_CACHE")
    for value, why in ((cli, "--cache"), (env, "$BACKBENCH_CACHE"), (config.cache, f"cache in {config.source}")):
        if value:
            return value, why
    return DEFAULT_CACHE, "the default"


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
