"""The leaderboard's uncertainty: bootstrap intervals, rank intervals, pairwise tests, stability.

Everything here is computed from the records and their per-sample outcome arrays (see
:class:`backbench.tasks.base.Resampler`), never by refitting:

- **Cells.** A 95 % percentile bootstrap interval of each (backbone, task:dataset) metric over
  the evaluated samples (``bootstrap`` resamples, seeded). The resamples are *paired*: every
  backbone of a column is scored on the same resampled positions (Efron & Tibshirani 1993).
  Few-shot cells resample seeds and samples together.
- **Ranks.** Each bootstrap replicate of every cell gives a replicate of the whole leaderboard
  (z-scores, task means, aggregate, ranks); a backbone's rank interval is the 2.5–97.5 %
  range of its rank over them, and a backbone is *not separable from #1* when the interval of
  its aggregate's difference to #1 contains 0.
- **Pairwise.** P(a beats b) over the replicates; a Friedman test over the (task, dataset)
  blocks, Wilcoxon signed-rank post-hoc tests with Holm's correction (Demšar 2006; Benavoli
  et al. 2016), drawn as a critical-difference diagram (scikit-posthocs).
- **Aggregates.** BoB's mean z-score (default), the mean rank over blocks, and the
  interquartile mean of min-max normalised scores (Agarwal et al. 2021).
- **Stability.** Kendall's τ between the full ranking and each leave-one-task-out ranking.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

AGGREGATES = ("zmean", "rank", "iqm")
BOOTSTRAP = 1000  # resamples by default
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A value with its 95 % interval (``low``/``high`` None where it has none) and sample count."""

    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None  # evaluated samples behind the value (None: no outcomes kept)
    std: float | None = None  # few-shot: std over seeds

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


@dataclass
class Statistics:
    """The uncertainty of one leaderboard (see the module doc); backbones in the leaderboard's order."""

    bootstrap: int
    seed: int
    aggregate: str  # which aggregate ranks: zmean, rank or iqm
    cells: dict[tuple[str, str], Interval] = field(default_factory=dict)  # (backbone, task:dataset)
    score: dict[str, Interval] = field(default_factory=dict)  # backbone -> the ranking aggregate
    aggregates: dict[str, dict[str, Interval]] = field(default_factory=dict)  # zmean/rank/iqm -> backbone -> value
    rank: dict[str, tuple[int, int | None, int | None]] = field(default_factory=dict)  # backbone -> (rank, low, high)
    tied_with_first: list[str] = field(default_factory=list)  # not separable from #1 (#1 included)
    # per column: the backbones whose paired difference to the column's best has an interval containing 0
    column_ties: dict[str, list[str]] = field(default_factory=dict)
    prob_beats: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [a, b]: P(a ranks above b)
    friedman: dict[str, Any] | None = None  # {statistic, pvalue, blocks} or {note} where it cannot run
    posthoc: np.ndarray | None = None  # Holm-adjusted Wilcoxon p-values [a, b] (None: fewer than 3 backbones / no extra)
    mean_ranks: dict[str, float] = field(default_factory=dict)  # over the (task, dataset) blocks, 1 = best
    stability: dict[str, Any] = field(default_factory=dict)  # {tau: {task: τ}, min, task, sentence}
    fewshot: dict[str, dict[int, Interval]] = field(default_factory=dict)  # backbone -> shots -> mean ± std, CI
    notes: list[str] = field(default_factory=list)  # what could not be computed and why


# --------------------------------------------------------------------------- resampling
CHUNK = 100  # replicates drawn and scored at a time: bounds memory at CHUNK x n positions per stratum


def column_seed(seed: int, column: str, strata: tuple[int, ...]) -> np.random.SeedSequence:
    """The seed of one column's resamples: the same for every backbone whose strata agree (paired)."""
    import zlib

    return np.random.SeedSequence([seed, zlib.crc32(column.encode()), *strata])


def replicates(resamplers: list, bootstrap: int, rng_seed: np.random.SeedSequence,
               seeds_resampled: bool = True) -> np.ndarray:
    """(bootstrap,) replicate values of the mean over ``resamplers`` (one per seed of a cell);
    see :func:`shared_replicates`."""
    return shared_replicates([resamplers], bootstrap, rng_seed, seeds_resampled)[0]


def shared_replicates(members: list[list], bootstrap: int, rng_seed: np.random.SeedSequence,
                      seeds_resampled: bool = True) -> list[np.ndarray]:
    """For each member (the per-seed resamplers of one backbone's cell, all members with the
    same strata), its (bootstrap,) replicates on the *same* resampled positions (paired).

    Samples are resampled with replacement in each stratum, the same positions for every
    seed; with several seeds, the seeds are resampled too (few-shot: seeds x samples), the
    same seed draws for every member with as many seeds. Positions are drawn once per chunk
    of replicates for all members.
    """
    from backbench.probe.box_resample import multiplicities

    strata = members[0][0].strata
    state = [int(x) for x in rng_seed.generate_state(4)]  # deterministic: spawn() would advance the sequence
    samples, seeds = np.random.default_rng([*state, 0]), np.random.default_rng([*state, 1])
    out = [np.empty(bootstrap) for _ in members]
    for start in range(0, bootstrap, CHUNK):
        b = min(CHUNK, bootstrap - start)
        idx = [samples.integers(0, n, size=(b, n), dtype=np.int64) for n in strata]
        weights: list[np.ndarray] = []  # the same resamples as multiplicities, made once if a member takes them
        picks: dict[int, np.ndarray] = {}
        for m, resamplers in enumerate(members):
            if not weights and any(r.weighted for r in resamplers):
                weights = [multiplicities(rows, n) for rows, n in zip(idx, strata)]
            per_seed = np.stack([np.asarray(r.weighted(weights) if r.weighted else r.statistic(idx), dtype=np.float64)
                                 for r in resamplers])  # (S, b)
            S = len(resamplers)
            if S > 1 and seeds_resampled:
                if S not in picks:
                    picks[S] = seeds.integers(0, S, size=(b, S))
                out[m][start:start + b] = np.take_along_axis(per_seed.T, picks[S], axis=1).mean(axis=1)
            else:
                out[m][start:start + b] = per_seed.mean(axis=0)
    return out


def identity_value(resampler) -> float:
    """The metric with every sample once (equals the record's own value)."""
    return float(np.asarray(resampler.statistic([np.arange(n)[None, :] for n in resampler.strata]))[0])


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of ``values`` (finite ones)."""
    v = values[np.isfinite(values)]
    if not len(v):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


# --------------------------------------------------------------------------- aggregates
@contextmanager
def _quiet() -> Iterator[None]:
    """All-NaN slices (a cell a backbone lacks) are expected here, not news."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def zscore_columns(V: np.ndarray) -> np.ndarray:
    """z-scores down axis 0 of ``V`` (backbones, columns[, replicates]), NaN-aware, population std;
    a constant column gives 0, a column with fewer than two values NaN (as the leaderboard)."""
    with _quiet():
        mean = np.nanmean(V, axis=0, keepdims=True)
        std = np.nanstd(V, axis=0, keepdims=True)
    z = np.divide(V - mean, std, out=np.zeros_like(V), where=std > 0)
    z[np.isnan(V)] = np.nan
    z[:, np.isfinite(V).sum(axis=0) < 2] = np.nan
    return z


def zmean(V: np.ndarray, task_of: list[int], n_tasks: int) -> np.ndarray:
    """BoB's aggregate: z-score per column, mean over a task's columns, mean over tasks."""
    z = zscore_columns(V)
    with _quiet():
        per_task = np.stack([np.nanmean(z[:, [j for j, t in enumerate(task_of) if t == k]], axis=1)
                             for k in range(n_tasks)], axis=1)
        return np.nanmean(per_task, axis=1)


def block_ranks(V: np.ndarray) -> np.ndarray:
    """Rank of each backbone in each column (1 = best, ties averaged); NaN where missing or
    where the column has fewer than two values."""
    from scipy.stats import rankdata

    r = rankdata(-V, axis=0, nan_policy="omit")
    r[:, np.isfinite(V).sum(axis=0) < 2] = np.nan
    return r


def mean_rank(V: np.ndarray) -> np.ndarray:
    """The mean over (task, dataset) blocks of a backbone's rank in the block (lower is better)."""
    with _quiet():
        return np.nanmean(block_ranks(V), axis=1)


def iqm(V: np.ndarray) -> np.ndarray:
    """Interquartile mean over columns of min-max normalised scores (Agarwal et al. 2021):
    each column scaled to [0, 1] across backbones, then ``scipy.stats.trim_mean(., 0.25)``."""
    from scipy.stats import trim_mean

    with _quiet():
        lo, hi = np.nanmin(V, axis=0, keepdims=True), np.nanmax(V, axis=0, keepdims=True)
    span = hi - lo
    norm = np.divide(V - lo, span, out=np.full_like(V, np.nan), where=span > 0)
    out = np.full((V.shape[0],) + V.shape[2:], np.nan)
    for i in range(V.shape[0]):
        cols = np.isfinite(norm[i]).all(axis=tuple(range(1, norm[i].ndim))) if norm.ndim > 2 else np.isfinite(norm[i])
        if cols.any():
            out[i] = trim_mean(norm[i][cols], 0.25, axis=0)
    return out


def score(V: np.ndarray, how: str, task_of: list[int], n_tasks: int) -> np.ndarray:
    """The aggregate ``how`` of ``V`` as a higher-is-better score (mean rank negated)."""
    if how == "zmean":
        return zmean(V, task_of, n_tasks)
    if how == "rank":
        return -mean_rank(V)
    if how == "iqm":
        return iqm(V)
    raise ValueError(f"aggregate {how!r}: use one of {', '.join(AGGREGATES)}")


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """Ranks (1 = best, ties share the better rank) down axis 0; NaN scores rank last."""
    from scipy.stats import rankdata

    return rankdata(-np.nan_to_num(scores, nan=-np.inf), axis=0, method="min").astype(int)


# --------------------------------------------------------------------------- the leaderboard's statistics
@dataclass
class _Cell:
    """One (backbone, column): its records grouped by shots (each group: one record per seed)."""

    value: float
    groups: dict[Any, list]  # shots (None for non-few-shot) -> resamplers, one per seed; [] when none kept


def cell_resamplers(records: list[dict[str, Any]], outcomes: Callable[[dict[str, Any]], dict[str, Any]],
                    ) -> dict[Any, list] | None:
    """The cell's resamplers by shots, or None when a record keeps no outcomes (old records)."""
    from backbench.tasks.base import resampler

    groups: dict[Any, list] = {}
    for r in sorted(records, key=lambda r: (str(r.get("params", {}).get("shots")), r.get("seed") or 0)):
        rs = resampler(r, outcomes(r)) if r.get("outcomes") else None
        if rs is None:
            return None
        groups.setdefault(r.get("params", {}).get("shots"), []).append(rs)
    return groups


def column_replicates(column: str, cells: dict[str, dict[Any, list]], bootstrap: int,
                      seed: int) -> dict[str, dict[Any, np.ndarray]]:
    """Per backbone of one column, per shots group, (bootstrap,) replicates of the group's mean
    over seeds (a cell's value is the mean over its groups). Backbones whose strata agree share
    the resampled positions (paired) and each chunk of positions is drawn once for them all."""
    by_strata: dict[tuple, list[tuple[str, Any]]] = {}
    for b, groups in cells.items():
        for shots, g in groups.items():
            by_strata.setdefault((str(shots), g[0].strata), []).append((b, shots))
    out: dict[str, dict[Any, np.ndarray]] = {b: {} for b in cells}
    for (shots_key, strata), members in by_strata.items():
        reps = shared_replicates([cells[b][shots] for b, shots in members], bootstrap,
                                 column_seed(seed, f"{column}|{shots_key}", strata))
        for (b, shots), r in zip(members, reps):
            out[b][shots] = r
    return out


def compute(lb: Any, cell_records: dict[tuple[str, str], list[dict[str, Any]]],
            outcomes: Callable[[dict[str, Any]], dict[str, Any]], *, bootstrap: int = BOOTSTRAP,
            aggregate: str = "zmean", seed: int = 0) -> Statistics:
    """The :class:`Statistics` of leaderboard ``lb`` from its cells' records and their outcomes."""
    st = Statistics(bootstrap, seed, aggregate)
    nb, nc = lb.values.shape
    R = np.repeat(lb.values[:, :, None], bootstrap, axis=2)  # cells without outcomes stay at their value
    no_outcomes: list[str] = []
    not_resampled: list[str] = []
    curves: dict[tuple[str, int], list[tuple[np.ndarray, list[float]]]] = {}  # (backbone, shots) -> per dataset
    resampled: dict[str, dict[str, dict[Any, list]]] = {}  # column -> backbone -> shots -> resamplers
    for (b, c), recs in cell_records.items():
        i, j = lb.backbones.index(b), lb.columns.index(c)
        st.cells[(b, c)] = Interval(float(lb.values[i, j]))
        groups = cell_resamplers(recs, outcomes)
        if groups is None:
            kept = all(r.get("outcomes") for r in recs)
            (not_resampled if kept else no_outcomes).append(f"{b} {c}")
            continue
        own = float(np.mean([np.mean([identity_value(r) for r in g]) for g in groups.values()]))
        if not np.isclose(own, lb.values[i, j], rtol=1e-5, atol=1e-6):
            st.notes.append(f"{b} {c}: its outcome arrays give {own:.6g}, its record {lb.values[i, j]:.6g}; "
                            f"no interval (rerun the task with --force)")
            continue
        resampled.setdefault(c, {})[b] = groups
    for c, cells in resampled.items():
        j = lb.columns.index(c)
        for b, reps in column_replicates(c, cells, bootstrap, seed).items():
            i = lb.backbones.index(b)
            R[i, j] = np.mean(list(reps.values()), axis=0)
            low, high = percentile_interval(R[i, j])
            n = int(sum(next(iter(cells[b].values()))[0].strata))
            st.cells[(b, c)] = Interval(float(lb.values[i, j]), low, high, n=n)
            if c.startswith("fewshot:"):
                for shots, g in cells[b].items():
                    curves.setdefault((b, int(shots)), []).append((reps[shots], [identity_value(r) for r in g]))
    if no_outcomes:
        st.notes.append(f"no per-sample outcomes (records written before they were kept, or their cache is not at hand): "
                        f"{'; '.join(no_outcomes)}; their cells have no interval and are held fixed in the "
                        f"rank intervals")
    if not_resampled:
        st.notes.append(f"no interval for {'; '.join(not_resampled)}: the task does not resample its metric from "
                        f"its outcomes (or their cache is not at hand); held fixed in the rank intervals")
    st.fewshot = fewshot_bands(curves)
    task_of = [lb.tasks.index(c.split(":")[0]) for c in lb.columns]
    st.column_ties = column_ties(lb, R, resampled)
    _aggregates(st, lb, R, task_of)
    if not resampled:  # nothing varies: intervals would collapse onto the values, so there are none
        st.aggregates = {how: {b: Interval(v.value) for b, v in per.items()} for how, per in st.aggregates.items()}
        st.score = st.aggregates[st.aggregate]
        st.rank = {b: (r[0], None, None) for b, r in st.rank.items()}
        st.tied_with_first, st.prob_beats = [], np.zeros((0, 0))
    _pairwise(st, lb)
    st.stability = stability(lb, aggregate, task_of)
    return st


def column_ties(lb: Any, R: np.ndarray, resampled: dict[str, dict]) -> dict[str, list[str]]:
    """Per resampled column, its best backbone and those whose paired difference to it (same
    resampled positions) has a 95 % interval that contains 0."""
    tail = (1 - LEVEL) / 2
    out: dict[str, list[str]] = {}
    for c, cells in resampled.items():
        j = lb.columns.index(c)
        rows = [lb.backbones.index(b) for b in cells]
        best = max(rows, key=lambda i: lb.values[i, j])
        out[c] = [lb.backbones[i] for i in rows
                  if i == best or np.quantile(R[best, j] - R[i, j], tail) <= 0]
    return out


def fewshot_bands(curves: dict[tuple[str, int], list[tuple[np.ndarray, list[float]]]]) -> dict[str, dict[int, Interval]]:
    """Per backbone and shots: the mean over datasets and seeds, the std over seeds (of the
    mean over datasets) and the bootstrap interval over seeds x samples."""
    out: dict[str, dict[int, Interval]] = {}
    for (b, shots), per_dataset in sorted(curves.items()):
        reps = np.mean([r for r, _ in per_dataset], axis=0)
        seeds = min(len(v) for _, v in per_dataset)
        per_seed = np.mean([v[:seeds] for _, v in per_dataset], axis=0)
        low, high = percentile_interval(reps)
        out.setdefault(b, {})[shots] = Interval(float(np.mean([np.mean(v) for _, v in per_dataset])), low, high,
                                                std=float(np.std(per_seed)) if seeds > 1 else None)
    return out


def _aggregates(st: Statistics, lb: Any, R: np.ndarray, task_of: list[int]) -> None:
    """Every aggregate with its interval; ranks and rank intervals by ``st.aggregate``."""
    n_tasks = len(lb.tasks)
    reps = {}
    for how in AGGREGATES:
        point = score(lb.values, how, task_of, n_tasks)
        reps[how] = score(R, how, task_of, n_tasks)  # (backbones, bootstrap)
        sign = -1.0 if how == "rank" else 1.0  # mean rank is shown as itself (lower is better)
        st.aggregates[how] = {}
        for i, b in enumerate(lb.backbones):
            low, high = sorted(sign * np.array(percentile_interval(reps[how][i])))
            st.aggregates[how][b] = Interval(float(sign * point[i]), float(low), float(high))
    st.score = st.aggregates[st.aggregate]
    chosen = reps[st.aggregate]
    ranks = ranks_of(chosen)
    for i, b in enumerate(lb.backbones):
        st.rank[b] = (int(lb.rank[i]), int(np.floor(np.quantile(ranks[i], 0.025))),
                      int(np.ceil(np.quantile(ranks[i], 0.975))))
    if not lb.backbones:
        return
    first = int(np.argmin(lb.rank))
    tail = (1 - LEVEL) / 2
    with _quiet():
        st.tied_with_first = [b for i, b in enumerate(lb.backbones)
                              if i == first or np.quantile(chosen[i] - chosen[first], 1 - tail) >= 0]
    a, b = chosen[:, None, :], chosen[None, :, :]
    st.prob_beats = (a > b).mean(axis=2) + 0.5 * (a == b).mean(axis=2)
    np.fill_diagonal(st.prob_beats, np.nan)


def complete_blocks(lb: Any) -> np.ndarray:
    """The (task, dataset) columns every backbone has a value in: (backbones, blocks)."""
    V = lb.values
    return V[:, np.isfinite(V).all(axis=0)] if V.size else V


def _pairwise(st: Statistics, lb: Any) -> None:
    """Friedman over the complete blocks, Wilcoxon signed-rank + Holm post-hoc, mean ranks."""
    from scipy.stats import friedmanchisquare

    V = complete_blocks(lb)
    k, blocks = V.shape
    if k >= 2 and blocks >= 1:
        ranks = block_ranks(V).mean(axis=1)
        st.mean_ranks = {b: float(r) for b, r in zip(lb.backbones, ranks)}
    if k < 3 or blocks < 2:
        st.friedman = {"note": f"the Friedman test needs at least 3 backbones and 2 (task, dataset) blocks that "
                               f"every backbone has; here {k} backbones, {blocks} blocks"}
    else:
        with _quiet():
            res = friedmanchisquare(*V)
        st.friedman = {"statistic": float(res.statistic), "pvalue": float(res.pvalue), "blocks": int(blocks),
                       "backbones": int(k)}
    if k < 2 or blocks < 2:
        return
    try:
        import scikit_posthocs as sp
    except ImportError:
        st.notes.append("pairwise Wilcoxon-Holm tests and the critical-difference diagram need scikit-posthocs: "
                        "pip install 'backbench[stats]'")
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few blocks: scipy notes the exact test's small sample
        st.posthoc = sp.posthoc_wilcoxon(list(V), p_adjust="holm", zero_method="zsplit").to_numpy(dtype=float)


def stability(lb: Any, aggregate: str, task_of: list[int]) -> dict[str, Any]:
    """Kendall's τ between the full ranking and each leave-one-task-out ranking, the minimum,
    and a sentence naming what the least stable removal changes."""
    from scipy.stats import kendalltau

    n_tasks = len(lb.tasks)
    if n_tasks < 2 or len(lb.backbones) < 2:
        return {"tau": {}, "min": None, "task": None,
                "sentence": "stability needs at least two tasks and two backbones"}
    full = ranks_of(score(lb.values, aggregate, task_of, n_tasks))
    taus, moved = {}, {}
    for t, name in enumerate(lb.tasks):
        keep = [j for j, k in enumerate(task_of) if k != t]
        sub = [task_of[j] - (task_of[j] > t) for j in keep]
        loo = ranks_of(score(lb.values[:, keep], aggregate, sub, n_tasks - 1))
        with _quiet():
            tau = kendalltau(full, loo).statistic
        taus[name] = 1.0 if not np.isfinite(tau) else float(tau)  # all tied in both: the same order
        moved[name] = [(lb.backbones[i], int(full[i]), int(loo[i])) for i in np.argsort(full) if full[i] != loo[i]]
    worst = min(taus, key=lambda k: (taus[k], k))
    if not moved[worst]:
        sentence = "no single task changes the order: removing any one leaves the ranking as it is (Kendall's τ = 1)"
    else:
        change = ", ".join(f"{b} #{a}→#{z}" for b, a, z in moved[worst])
        sentence = (f"removing `{worst}` changes the order the most (Kendall's τ = {taus[worst]:.2f}): {change}")
    return {"tau": taus, "min": taus[worst], "task": worst, "sentence": sentence}
