"""Run a battle: extract what the cache lacks, then every task cell the results log lacks.

A cell is one (stage, backbone, dataset[, split]); cells are plain data, so a scheduler
(serial here, dask for a cluster) can run them anywhere that sees the cache. A failing cell
is reported and the rest still run; cells that need a failed extraction are skipped.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from backbench.battle.config import BattleConfig, DatasetSpec
from backbench.errors import BackbenchError, NotApplicable, require
from backbench.kinds import is_map
from backbench.store.cache import Cache
from backbench.tasks.base import FeatureSpec, RunOptions, get_task, run_task


@dataclass(frozen=True)
class Cell:
    stage: str  # "extract" or a task name
    backbone: str
    dataset: str
    split: str = ""
    shard: tuple[int, int] = (0, 1)  # extraction: this cell's share of the split's chunks
    features: str = "pooled"  # the feature kind(s) extracted, or read by the task

    @property
    def row(self) -> str:
        """The leaderboard row: the backbone, or ``NAME#KIND`` for another feature kind."""
        return FeatureSpec(self.features).row_label(self.backbone)

    @property
    def label(self) -> str:
        return (f"{self.stage} {self.row} {self.dataset}" + (f"/{self.split}" if self.split else "")
                + (f" shard {self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else ""))


@dataclass
class CellResult:
    cell: Cell
    status: str  # "done", "reused", "failed", "skipped", "n/a" (the task does not apply to this backbone)
    seconds: float = 0.0
    records: int = 0
    message: str = ""  # one line: what went wrong
    traceback: str = ""  # an unexpected error's traceback (in --json output, not in the table)

    def fail(self, exc: Exception) -> None:
        """Record ``exc``: a BackbenchError's own message; anything else as a bug, with its traceback."""
        self.status = "failed"
        text = " | ".join(str(exc).splitlines())
        if isinstance(exc, BackbenchError):
            self.message = text
            return
        self.message = f"unexpected {type(exc).__name__}: {text}"
        self.traceback = traceback.format_exc(limit=-4)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.cell), **{k: v for k, v in asdict(self).items() if k != "cell"}}


@dataclass
class BattleSummary:
    results: list[CellResult] = field(default_factory=list)

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status in ("failed", "skipped")]


def _refs(config: BattleConfig, ds: DatasetSpec, stage: str) -> set[tuple[str, str]]:
    """Every (dataset, split) that task ``stage`` on ``ds`` reads: its roles, and the
    ``DATASET:SPLIT`` sets its parameters name (those its schema marks as references)."""
    need = {(ds.name, s) for s in (ds.train, ds.eval, ds.val) if s}
    for key in get_task(stage).ref_params:
        need |= {tuple(str(r).split(":", 1)) for r in config.tasks[stage].get(key) or []}  # type: ignore[misc]
    return need


def dense_kind(kind: str) -> str:
    """The map kind dense tasks of a ``NAME#KIND`` entry read: KIND when it is a map, else ``map``."""
    return kind if is_map(kind) else "map"


def _input_kind(cell: Cell) -> str:
    """The feature kind the extraction cells a task cell reads were extracted as."""
    return dense_kind(cell.features) if get_task(cell.stage).dense else cell.features


def _kinds(config: BattleConfig, ds: DatasetSpec, kind: str) -> list[str]:
    """The kinds a dataset is extracted as for one entry: the entry's kind for image-level tasks
    (and OOD sets), a map for dense tasks."""
    tasks = config.tasks_for(ds)
    dense = [t for t in tasks if get_task(t).dense]
    out = [kind] if ds.role != "main" or len(dense) < len(tasks) else []
    return out + ([dense_kind(kind)] if dense and dense_kind(kind) not in out else [])


def plan(config: BattleConfig) -> list[Cell]:
    """Extraction cells first (grouped by backbone, so each loads once), then task cells."""
    n = config.shards
    cells = [Cell("extract", b, d.name, s, (i, n), k) for b, kind in config.entries
             for d in config.datasets.values() for k in _kinds(config, d, kind) for s in d.splits for i in range(n)]
    cells += [Cell(t, b, d.name, features=kind if not get_task(t).dense or is_map(kind) else "pooled")
              for b, kind in config.entries for d in config.main_datasets for t in config.tasks_for(d)]
    return list(dict.fromkeys(cells))  # an entry NAME#cls and NAME share their dense cells


def _task(cell: Cell, config: BattleConfig, cache: Cache, options: RunOptions) -> list[tuple[dict, bool]]:
    """One task cell through the registry: the dataset's roles, the config's parameters."""
    ds, task = config.datasets[cell.dataset], get_task(cell.stage)
    request = task.request(cell.backbone, ds.name, {"train": ds.train, "eval": ds.eval, "val": ds.val},
                           params=config.tasks[cell.stage], features=cell.features)
    return run_task(cache, request, options)


class _Extractor:
    """Loads each backbone once for all its extraction cells."""

    def __init__(self, config: BattleConfig, cache: Cache) -> None:
        self.config, self.cache, self.loaded = config, cache, {}

    def __call__(self, cell: Cell, progress: Callable[[int, int], None] | None) -> str:
        from backbench.extract.backbones import load_backbone
        from backbench.extract.run import extract

        if cell.backbone not in self.loaded:
            self.loaded = {cell.backbone: load_backbone(cell.backbone)}  # keep one model in memory
        ds = self.config.datasets[cell.dataset]
        # a daemonic process (a dask worker) cannot start DataLoader workers: decode in-process
        workers = 0 if multiprocessing.current_process().daemon else self.config.workers
        res = extract(self.loaded[cell.backbone], ds.splits[cell.split], cache=self.cache, dataset=ds.name,
                      features=[cell.features], split=cell.split, limit=ds.limit, batch_size=self.config.batch_size,
                      device=self.config.device, workers=workers, progress=progress, shard=cell.shard)
        return "reused" if res.status == "up-to-date" else "done"


def _run_one(cell: Cell, config: BattleConfig, cache: Cache, options: RunOptions, extractor: _Extractor,
             missing: str, progress: Callable[[int, int], None] | None = None) -> CellResult:
    """One cell, here or on a dask worker: skipped when an extraction it needs failed
    (``missing`` names those); a failure is recorded, never raised (KeyboardInterrupt is)."""
    started = time.perf_counter()
    result = CellResult(cell, "done")
    try:
        if missing:
            result.status, result.message = "skipped", f"needs {missing}, whose extraction failed"
        elif cell.stage == "extract":
            result.status = extractor(cell, progress)
        else:
            pairs = _task(cell, config, cache, options)
            result.records = len(pairs)
            result.status = "reused" if pairs and all(reused for _, reused in pairs) else "done"
    except NotApplicable as exc:  # e.g. zero-shot on a backbone without a text tower: a note, not a failure
        result.status, result.message = "n/a", str(exc)
    except Exception as exc:  # a bug in one cell must not sink the battle
        result.fail(exc)
    result.seconds = time.perf_counter() - started
    return result


def _options(config: BattleConfig, memory_limit: int | str | None) -> RunOptions:
    from backbench.device import resolve_device

    return RunOptions(device=resolve_device(config.device), memory_limit=memory_limit)


def run_battle(config: BattleConfig, cache: Cache, *, on_start: Callable[[Cell, int], None] | None = None,
               on_done: Callable[[CellResult], None] | None = None,
               progress: Callable[[int, int], None] | None = None,
               memory_limit: int | str | None = None) -> BattleSummary:
    """Run every cell in order; failures are recorded, never raised (KeyboardInterrupt is)."""
    summary, extractor, failed = BattleSummary(), _Extractor(config, cache), set()
    options = _options(config, memory_limit)
    for i, cell in enumerate(plan(config)):
        if on_start:
            on_start(cell, i)
        result = _run_one(cell, config, cache, options, extractor, _missing_inputs(cell, config, failed), progress)
        if cell.stage == "extract" and result.status == "failed":
            failed.add((cell.backbone, cell.features, cell.dataset, cell.split))
        summary.results.append(result)
        if on_done:
            on_done(result)
    return summary


def _missing_inputs(cell: Cell, config: BattleConfig, failed: set[tuple[str, str, str, str]]) -> str:
    if cell.stage == "extract":
        return ""
    need = _refs(config, config.datasets[cell.dataset], cell.stage)
    return ", ".join(sorted(f"{d}/{s}" for d, s in need if (cell.backbone, _input_kind(cell), d, s) in failed))


def _run_cell(cell: Cell, config: BattleConfig, cache_path: str, options: RunOptions, *inputs: CellResult) -> CellResult:
    """One cell on a dask worker: it opens the cache itself; ``inputs`` are the extraction
    cells it needs (dask runs it after them); a failed one makes this cell skipped."""
    bad = ", ".join(sorted(f"{r.cell.dataset}/{r.cell.split}" for r in inputs if r.status in ("failed", "skipped")))
    cache = Cache(cache_path) if cell.stage == "extract" else Cache(cache_path, mode="r+")
    return _run_one(cell, config, cache, options, _Extractor(config, cache), bad)


def run_battle_dask(config: BattleConfig, cache: Cache, client, *,
                    on_done: Callable[[CellResult], None] | None = None, retries: int = 2,
                    memory_limit: int | str | None = None) -> BattleSummary:
    """Every cell as a dask task on ``client`` (a ``dask.distributed.Client``).

    Extraction cells run first, in parallel; each task cell depends on the extraction cells of
    the splits it reads. Cells are idempotent (extraction resumes by chunk, results records
    are atomic and reused), so a task lost with its worker is simply run again elsewhere
    (dask reschedules it; ``retries`` more for errors raised by the task itself). The cache
    must be visible to every worker at the same path or URL.
    """
    as_completed = require("dask.distributed", extra="dask").as_completed

    options = _options(config, memory_limit)
    cells = plan(config)
    futures, extraction, run_id = {}, {}, uuid.uuid4().hex[:8]
    for cell in cells:
        if cell.stage != "extract":
            continue
        f = client.submit(_run_cell, cell, config, cache.path, options, key=f"backbench-{run_id}-{cell.label}",
                          pure=False, retries=retries)
        futures[f] = cell
        extraction.setdefault((cell.backbone, cell.features, cell.dataset, cell.split), []).append(f)
    for cell in cells:
        if cell.stage == "extract":
            continue
        deps = [f for d, s in sorted(_refs(config, config.datasets[cell.dataset], cell.stage))
                for f in extraction.get((cell.backbone, _input_kind(cell), d, s), [])]
        f = client.submit(_run_cell, cell, config, cache.path, options, *deps, key=f"backbench-{run_id}-{cell.label}",
                          pure=False, retries=retries)
        futures[f] = cell
    done: dict[Cell, CellResult] = {}
    for f in as_completed(list(futures)):
        result = f.result()
        done[futures[f]] = result
        if on_done:
            on_done(result)
    return BattleSummary([done[c] for c in cells])
