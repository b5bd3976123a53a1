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
from backbench.errors import BackbenchError
from backbench.store.cache import Cache


@dataclass(frozen=True)
class Cell:
    stage: str  # "extract" or a task name
    backbone: str
    dataset: str
    split: str = ""
    shard: tuple[int, int] = (0, 1)  # extraction: this cell's share of the split's chunks

    @property
    def label(self) -> str:
        return (f"{self.stage} {self.backbone} {self.dataset}" + (f"/{self.split}" if self.split else "")
                + (f" shard {self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else ""))


@dataclass
class CellResult:
    cell: Cell
    status: str  # "done", "reused", "failed", "skipped"
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
    """Every (dataset, split) that task ``stage`` on ``ds`` reads."""
    need = {(ds.name, s) for s in (ds.train, ds.eval, ds.val) if s}
    key = {"ood": "ood", "shift": "shifted"}.get(stage)
    if key:
        need |= {tuple(str(r).split(":", 1)) for r in config.tasks[stage].get(key, [])}  # type: ignore[misc]
    return need


def plan(config: BattleConfig) -> list[Cell]:
    """Extraction cells first (grouped by backbone, so each loads once), then task cells."""
    n = config.shards
    cells = [Cell("extract", b, d.name, s, (i, n)) for b in config.backbones for d in config.datasets.values()
             for s in d.splits for i in range(n)]
    cells += [Cell(t, b, d.name) for b in config.backbones for d in config.main_datasets for t in config.tasks]
    return cells


def _task(cell: Cell, config: BattleConfig, cache: Cache, device: str) -> list[tuple[dict, bool]]:
    from backbench.probe.data import use_features

    name, _, kind = cell.backbone.partition("#")  # "NAME#cls": the tasks read that feature kind
    with use_features(kind or None):
        return _task_pairs(cell, config, cache, device, name)


def _task_pairs(cell: Cell, config: BattleConfig, cache: Cache, device: str, b: str) -> list[tuple[dict, bool]]:
    from backbench.probe import neighbour_tasks as nt
    from backbench.probe import ood_tasks as ot
    from backbench.probe import tasks as pt

    ds, p = config.datasets[cell.dataset], config.tasks[cell.stage]
    common = {"device": device}
    if cell.stage == "probe":
        return [pt.run_probe(cache, b, ds.name, ds.train, ds.eval, val=ds.val, Cs=p.get("C"), **common)]
    if cell.stage == "fewshot":
        return pt.run_few_shot(cache, b, ds.name, ds.train, ds.eval, shots=p.get("shots", [1, 2, 4, 8, 16]),
                               seeds=int(p.get("seeds", 3)), val=ds.val, Cs=p.get("C"), **common)
    if cell.stage == "knn":
        return nt.run_knn(cache, b, ds.name, ds.train, ds.eval, ks=p.get("k", [10, 20, 100, 200]),
                          temperature=float(p.get("temperature", 0.07)), **common)
    if cell.stage == "retrieval":
        return [nt.run_retrieval(cache, b, ds.name, ds.eval, ds.train, ks=p.get("ks", [1, 5, 10]), **common)]
    if cell.stage == "ood":
        out = []
        if p.get("ood"):
            out.append(ot.run_ood(cache, b, ds.name, ds.train, ds.eval, ood=p["ood"], scores=p.get("scores"), **common))
        if p.get("open_set"):
            out.append(ot.run_open_set(cache, b, ds.name, ds.train, ds.eval, holdout=p["open_set"],
                                       scores=p.get("scores"), **common))
        return out
    if cell.stage == "shift":
        return [ot.run_shift(cache, b, (ds.name, ds.train), (ds.name, ds.eval),
                             [tuple(str(r).split(":", 1)) for r in p.get("shifted", [])], **common)]
    raise BackbenchError(f"unknown task {cell.stage!r}")


class _Extractor:
    """Loads each backbone once for all its extraction cells."""

    def __init__(self, config: BattleConfig, cache: Cache) -> None:
        self.config, self.cache, self.loaded = config, cache, {}

    def __call__(self, cell: Cell, progress: Callable[[int, int], None] | None) -> str:
        from backbench.extract.backbones import load_backbone
        from backbench.extract.run import extract

        name, _, kind = cell.backbone.partition("#")  # "NAME#cls": extract that feature kind
        if name not in self.loaded:
            self.loaded = {name: load_backbone(name)}  # keep one model in memory
        ds = self.config.datasets[cell.dataset]
        # a daemonic process (a dask worker) cannot start DataLoader workers: decode in-process
        workers = 0 if multiprocessing.current_process().daemon else self.config.workers
        res = extract(self.loaded[name], ds.splits[cell.split], cache=self.cache, dataset=ds.name,
                      features=[kind or "pooled"],
                      split=cell.split, limit=ds.limit, batch_size=self.config.batch_size, device=self.config.device,
                      workers=workers, progress=progress, shard=cell.shard)
        return "reused" if res.status == "up-to-date" else "done"


def run_battle(config: BattleConfig, cache: Cache, *, on_start: Callable[[Cell, int], None] | None = None,
               on_done: Callable[[CellResult], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> BattleSummary:
    """Run every cell in order; failures are recorded, never raised (KeyboardInterrupt is)."""
    from backbench.extract.run import resolve_device

    summary, extractor, failed = BattleSummary(), _Extractor(config, cache), set()
    device = resolve_device(config.device)
    for i, cell in enumerate(plan(config)):
        if on_start:
            on_start(cell, i)
        started = time.perf_counter()
        result = CellResult(cell, "done")
        missing = _missing_inputs(cell, config, failed)
        try:
            if missing:
                result.status, result.message = "skipped", f"needs {missing}, whose extraction failed"
            elif cell.stage == "extract":
                result.status = extractor(cell, progress)
            else:
                pairs = _task(cell, config, cache, device)
                result.records = len(pairs)
                result.status = "reused" if pairs and all(reused for _, reused in pairs) else "done"
        except Exception as exc:  # a bug in one cell must not sink the battle
            result.fail(exc)
        if cell.stage == "extract" and result.status == "failed":
            failed.add((cell.backbone, cell.dataset, cell.split))
        result.seconds = time.perf_counter() - started
        summary.results.append(result)
        if on_done:
            on_done(result)
    return summary


def _missing_inputs(cell: Cell, config: BattleConfig, failed: set[tuple[str, str, str]]) -> str:
    if cell.stage == "extract":
        return ""
    need = _refs(config, config.datasets[cell.dataset], cell.stage)
    bad = sorted(f"{d}/{s}" for d, s in need if (cell.backbone, d, s) in failed)
    return ", ".join(bad)


def _run_cell(cell: Cell, config: BattleConfig, cache_path: str, device: str, *inputs: CellResult) -> CellResult:
    """One cell on a dask worker: it opens the cache itself; ``inputs`` are the extraction
    cells it needs (dask runs it after them); a failed one makes this cell skipped."""
    started = time.perf_counter()
    result = CellResult(cell, "done")
    bad = sorted(f"{r.cell.dataset}/{r.cell.split}" for r in inputs if r.status in ("failed", "skipped"))
    try:
        if bad:
            result.status, result.message = "skipped", f"needs {', '.join(bad)}, whose extraction failed"
        elif cell.stage == "extract":
            result.status = _Extractor(config, Cache(cache_path))(cell, None)
        else:
            pairs = _task(cell, config, Cache(cache_path, mode="r+"), device)
            result.records = len(pairs)
            result.status = "reused" if pairs and all(reused for _, reused in pairs) else "done"
    except Exception as exc:
        result.fail(exc)
    result.seconds = time.perf_counter() - started
    return result


def run_battle_dask(config: BattleConfig, cache: Cache, client, *,
                    on_done: Callable[[CellResult], None] | None = None, retries: int = 2) -> BattleSummary:
    """Every cell as a dask task on ``client`` (a ``dask.distributed.Client``).

    Extraction cells run first, in parallel; each task cell depends on the extraction cells of
    the splits it reads. Cells are idempotent (extraction resumes by chunk, results records
    are atomic and reused), so a task lost with its worker is simply run again elsewhere
    (dask reschedules it; ``retries`` more for errors raised by the task itself). The cache
    must be visible to every worker at the same path or URL.
    """
    from dask.distributed import as_completed

    from backbench.extract.run import resolve_device

    device = resolve_device(config.device)
    cells = plan(config)
    futures, extraction, run_id = {}, {}, uuid.uuid4().hex[:8]
    for cell in cells:
        if cell.stage != "extract":
            continue
        f = client.submit(_run_cell, cell, config, cache.path, device, key=f"backbench-{run_id}-{cell.label}",
                          pure=False, retries=retries)
        futures[f] = cell
        extraction.setdefault((cell.backbone, cell.dataset, cell.split), []).append(f)
    for cell in cells:
        if cell.stage == "extract":
            continue
        deps = [f for d, s in sorted(_refs(config, config.datasets[cell.dataset], cell.stage))
                for f in extraction.get((cell.backbone, d, s), [])]
        f = client.submit(_run_cell, cell, config, cache.path, device, *deps, key=f"backbench-{run_id}-{cell.label}",
                          pure=False, retries=retries)
        futures[f] = cell
    done: dict[Cell, CellResult] = {}
    for f in as_completed(list(futures)):
        result = f.result()
        done[futures[f]] = result
        if on_done:
            on_done(result)
    return BattleSummary([done[c] for c in cells])
