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

from dataclasses import dataclass, field
from typing import Any

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
    rank: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # backbone -> (rank, low, high)
    tied_with_first: list[str] = field(default_factory=list)  # not separable from #1 (#1 included)
    prob_beats: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [a, b]: P(a ranks above b)
    friedman: dict[str, Any] | None = None  # {statistic, pvalue, blocks} or {note} where it cannot run
    posthoc: np.ndarray | None = None  # Holm-adjusted Wilcoxon p-values [a, b] (None: fewer than 3 backbones / no extra)
    mean_ranks: dict[str, float] = field(default_factory=dict)  # over the (task, dataset) blocks, 1 = best
    stability: dict[str, Any] = field(default_factory=dict)  # {tau: {task: τ}, min, task, sentence}
    fewshot: dict[str, dict[int, Interval]] = field(default_factory=dict)  # backbone -> shots -> mean ± std, CI
    notes: list[str] = field(default_factory=list)  # what could not be computed and why
