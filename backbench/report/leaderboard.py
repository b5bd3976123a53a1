"""The leaderboard: results records -> one row per backbone, Battle-of-the-Backbones z-scores.

For every (task, dataset) column, each backbone's main metric is turned into a z-score
across backbones (population std); a task's z-score is the mean over its datasets, the
aggregate the mean over tasks, and the rank orders the aggregate (1 = best). All main
metrics are higher-is-better.

A missing cell (a backbone without a record for a task:dataset) has no z-score: it is never
counted as 0, it is left out of that backbone's means, each row says how many tasks its mean
covers, and :meth:`Leaderboard.notes` lists the missing cells. A cell whose task does not
apply to the backbone (a record that says ``not_applicable``: zero-shot without a text tower)
is shown as ``n/a`` and left out the same way, listed apart from the missing ones. A column
that only one backbone has compares nothing, so it has no z-score either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from backbench.errors import OptionError

def main_metrics() -> dict[str, str]:
    """Record task name -> the metric it is ranked by, in the registry's order (its columns' order)."""
    from backbench.tasks.base import registered

    out: dict[str, str] = {}
    for task in registered().values():
        out.update({task.name: task.metric, **task.records})
    return out


@dataclass
class Leaderboard:
    backbones: list[str]
    columns: list[str]  # "task:dataset"
    values: np.ndarray  # (backbones, columns), NaN where missing
    tasks: list[str] = field(default_factory=list)
    task_z: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    aggregate: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rank: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    spearman: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    fewshot: dict[str, dict[int, float]] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, str | None] = field(default_factory=dict)  # row -> feature spec its records read
    na: dict[tuple[str, str], str] = field(default_factory=dict)  # (backbone, task:dataset) -> why it does not apply
    stats: Any = None  # :class:`backbench.report.stats.Statistics`, None with bootstrap=0
    ranked_by: str = "zmean"  # the aggregate ``rank`` orders: zmean, rank (mean rank) or iqm

    @property
    def missing(self) -> list[tuple[str, str]]:
        """(backbone, task:dataset) cells without a record, in table order."""
        return [(b, c) for i, b in enumerate(self.backbones) for j, c in enumerate(self.columns)
                if np.isnan(self.values[i, j]) and (b, c) not in self.na]

    @property
    def single(self) -> list[str]:
        """Columns that only one backbone has: nothing to compare, so no z-score."""
        return [c for j, c in enumerate(self.columns) if np.isfinite(self.values[:, j]).sum() == 1]

    def covered(self, i: int) -> int:
        """How many tasks enter backbone ``i``'s mean (those with a z-score)."""
        return int(np.isfinite(self.task_z[i]).sum()) if self.tasks else 0

    def notes(self) -> list[str]:
        """Plain-text lines that say which cells are missing and which columns are not compared."""
        out = []
        if self.missing:
            cells = "; ".join(f"{b} {c}" for b, c in self.missing)
            out.append(f"missing cells (no record; left out of that backbone's mean, shown as –): {cells}")
        if self.na:
            cells = "; ".join(f"{b} {c}" for b, c in self.na)
            out.append(f"n/a cells (the task does not apply to the backbone, e.g. zero-shot without a text tower; "
                       f"left out of its mean): {cells}")
        if self.single:
            out.append(f"only one backbone has {', '.join(self.single)}: no z-score (nothing to compare)")
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per backbone, best first: rank, aggregate, tasks covered, task z-scores, raw metrics."""
        out = []
        for i in np.argsort(self.rank):
            row: dict[str, Any] = {"rank": int(self.rank[i]), "backbone": self.backbones[i],
                                   "z_mean": _num(self.aggregate[i]), "tasks": f"{self.covered(i)}/{len(self.tasks)}"}
            row.update({f"z:{t}": _num(self.task_z[i, j]) for j, t in enumerate(self.tasks)})
            b = self.backbones[i]
            row.update({c: "n/a" if (b, c) in self.na else _num(self.values[i, j]) for j, c in enumerate(self.columns)})
            row["missing"] = ", ".join(c for j, c in enumerate(self.columns)
                                       if np.isnan(self.values[i, j]) and (b, c) not in self.na)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows(), "tasks": self.tasks, "columns": self.columns,
                "missing": [{"backbone": b, "column": c} for b, c in self.missing], "notes": self.notes(),
                "not_applicable": [{"backbone": b, "column": c, "reason": why} for (b, c), why in self.na.items()],
                "spearman": {"tasks": self.tasks, "matrix": [[_num(v) for v in r] for r in self.spearman]},
                "fewshot": {b: {str(k): v for k, v in c.items()} for b, c in self.fewshot.items()},
                "provenance": self.provenance, "features": self.features, **self.uncertainty()}

    def uncertainty(self) -> dict[str, Any]:
        """Issue-23 JSON: per backbone its rank interval and aggregate with interval; per cell its
        value, interval and n; the pairwise tests; stability. Empty without statistics."""
        st = self.stats
        if st is None:
            return {}
        metric = main_metrics()
        ranking = []
        for i in np.argsort(self.rank):
            b = self.backbones[i]
            rank, low, high = st.rank[b]
            agg = st.score[b]
            ranking.append({"backbone": b, "rank": rank, "rank_low": low, "rank_high": high,
                            "aggregate": st.aggregate, "value": _num(agg.value), "ci_low": _num(agg.low),
                            "ci_high": _num(agg.high), "tied_with_first": b in st.tied_with_first,
                            "aggregates": {k: {"value": _num(v[b].value), "ci_low": _num(v[b].low),
                                               "ci_high": _num(v[b].high)} for k, v in st.aggregates.items()}})
        cells = [{"backbone": b, "task": c.split(":", 1)[0], "dataset": c.split(":", 1)[1],
                  "metric": metric.get(c.split(":", 1)[0]), "value": _num(v.value), "ci_low": _num(v.low),
                  "ci_high": _num(v.high), "n": v.n} for (b, c), v in st.cells.items()]
        square = (lambda m: None if m is None else [[_num(x) for x in row] for row in m])
        return {"statistics": {"bootstrap": st.bootstrap, "seed": st.seed, "aggregate": st.aggregate,
                               "level": 0.95, "notes": st.notes},
                "ranking": ranking, "cells": cells,
                "pairwise": {"backbones": self.backbones, "prob_beats": square(st.prob_beats),
                             "friedman": st.friedman, "wilcoxon_holm_p": square(st.posthoc),
                             "mean_ranks": {b: _num(v) for b, v in st.mean_ranks.items()},
                             "not_separable_from_first": st.tied_with_first, "column_ties": st.column_ties},
                "stability": st.stability,
                "fewshot_bands": {b: {str(k): {"mean": _num(v.value), "std": _num(v.std), "ci_low": _num(v.low),
                                               "ci_high": _num(v.high)} for k, v in c.items()}
                                  for b, c in st.fewshot.items()}}


def _num(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def _latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest record per (backbone, task, dataset, shots, seed): reruns replace, not add."""
    best: dict[tuple, dict[str, Any]] = {}
    metrics = main_metrics()
    for r in sorted(records, key=lambda r: r.get("created", "")):
        if r.get("task") in metrics and metrics[r["task"]] in r.get("metrics", {}):
            key = (r["backbone"], r["task"], r["dataset"], r.get("params", {}).get("shots"), r.get("seed"))
            best[key] = r
    return list(best.values())


def zscores(values: np.ndarray) -> np.ndarray:
    """Column-wise z-scores across rows (population std), ignoring NaN; constant columns give 0.

    Missing values stay NaN, and so does a column with fewer than two values (a z-score
    compares a backbone with the others; alone, it has none). One implementation with the
    bootstrap's replicates: :func:`backbench.report.stats.zscore_columns`.
    """
    from backbench.report.stats import zscore_columns

    return zscore_columns(values)


def build(records: Iterable[dict[str, Any]], *, bootstrap: int = 1000, aggregate: str = "zmean", seed: int = 0,
          outcomes: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Leaderboard:
    """Aggregate records into a :class:`Leaderboard` ranked by ``aggregate`` (zmean, rank or iqm),
    with its :class:`~backbench.report.stats.Statistics` from ``bootstrap`` resamples of the
    records' outcome arrays (read by ``outcomes``, default: from each record's cache); 0: none."""
    import warnings

    from backbench.report import stats as S

    if aggregate not in S.AGGREGATES:
        raise OptionError(f"aggregate {aggregate!r}: use one of {', '.join(S.AGGREGATES)}")
    if bootstrap < 0:
        raise OptionError(f"bootstrap {bootstrap}: give a number of resamples >= 0 (0: no intervals)")
    records = list(records)
    recs = _latest(records)
    metric = main_metrics()
    cells: dict[tuple[str, str], list[float]] = {}
    curves: dict[str, dict[int, list[float]]] = {}
    for r in recs:
        value = float(r["metrics"][metric[r["task"]]])
        cells.setdefault((r["backbone"], f"{r['task']}:{r['dataset']}"), []).append(value)
        if r["task"] == "fewshot":
            curves.setdefault(r["backbone"], {}).setdefault(int(r["params"]["shots"]), []).append(value)
    backbones = sorted({b for b, _ in cells})
    columns = sorted({c for _, c in cells}, key=lambda c: (list(metric).index(c.split(":")[0]), c))
    values = np.full((len(backbones), len(columns)), np.nan)
    for (b, c), v in cells.items():
        values[backbones.index(b), columns.index(c)] = float(np.mean(v))
    lb = Leaderboard(backbones, columns, values)
    lb.na = {cell: str(r["not_applicable"]) for r in records if r.get("not_applicable") and r.get("task") in metric
             for cell in [(r["backbone"], f"{r['task']}:{r['dataset']}")]
             if cell[0] in backbones and cell[1] in columns and cell not in cells}
    lb.tasks = list(dict.fromkeys(c.split(":")[0] for c in columns))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: a task a backbone lacks
        z = zscores(values)
        lb.task_z = np.stack([np.nanmean(z[:, [j for j, c in enumerate(columns) if c.split(":")[0] == t]], axis=1)
                              for t in lb.tasks], axis=1) if columns else np.zeros((len(backbones), 0))
        lb.aggregate = np.nanmean(lb.task_z, axis=1) if columns else np.zeros(len(backbones))
    ranked = lb.aggregate if aggregate == "zmean" else S.score(values, aggregate, [lb.tasks.index(c.split(":")[0])
                                                                                  for c in columns], len(lb.tasks))
    order = np.argsort(-np.nan_to_num(ranked, nan=-np.inf), kind="stable")
    lb.ranked_by = aggregate
    lb.rank = np.empty(len(backbones), dtype=int)
    lb.rank[order] = np.arange(1, len(backbones) + 1)
    lb.spearman = task_spearman(lb.task_z)
    lb.fewshot = {b: {k: float(np.mean(v)) for k, v in sorted(c.items())} for b, c in curves.items()}
    lb.provenance = provenance(recs)
    lb.features = {b: next((r["features"] for r in recs if r["backbone"] == b and "features" in r), None)
                   for b in backbones}  # None: records written before they carried it
    if bootstrap and backbones:
        by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in recs:
            by_cell.setdefault((r["backbone"], f"{r['task']}:{r['dataset']}"), []).append(r)
        lb.stats = S.compute(lb, by_cell, outcomes or CacheOutcomes(), bootstrap=bootstrap, aggregate=aggregate,
                             seed=seed)
    return lb


class CacheOutcomes:
    """Reads a record's outcome arrays from the cache it names (each cache opened once),
    verified against their SHA-256; a cache that is not there gives none (the cell shows n/a)."""

    def __init__(self) -> None:
        self._caches: dict[str, Any] = {}

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        from backbench.store.cache import Cache
        from backbench.store.results import ResultsLog

        path = record.get("cache")
        if not record.get("outcomes") or not path:
            return {}
        if path not in self._caches:
            try:
                self._caches[path] = ResultsLog(Cache(path, mode="r"))
            except Exception:  # moved or deleted: the report renders without its intervals
                self._caches[path] = None
        log = self._caches[path]
        return {} if log is None else log.outcomes(record)


def task_spearman(task_z: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between tasks, across backbones (NaN with < 3 backbones)."""
    import warnings

    from scipy.stats import spearmanr

    n_tasks = task_z.shape[1]
    out = np.full((n_tasks, n_tasks), np.nan)
    for a in range(n_tasks):
        for b in range(n_tasks):
            ok = np.isfinite(task_z[:, a]) & np.isfinite(task_z[:, b])
            if ok.sum() >= 3:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a constant column: scipy warns and gives NaN
                    out[a, b] = spearmanr(task_z[ok, a], task_z[ok, b]).statistic
    return out


def provenance(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each backbone's results came from: caches, library versions, dates."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in records:
        v = r.get("versions", {})
        key = (r["backbone"], r.get("cache"), v.get("backbench"), v.get("torch"), v.get("timm"))
        entry = seen.setdefault(key, {"backbone": r["backbone"], "cache": r.get("cache"),
                                      "backbench": v.get("backbench"), "torch": v.get("torch"),
                                      "timm": v.get("timm"), "records": 0, "first": r.get("created"),
                                      "last": r.get("created")})
        entry["records"] += 1
        entry["last"] = max(entry["last"] or "", r.get("created") or "")
    return sorted(seen.values(), key=lambda e: (e["backbone"], str(e["cache"])))
