"""Vectorised bootstrap statistics of the tasks' main metrics, from their per-sample outcomes.

Each task keeps the per-sample outcomes its main metric is made of (``correct`` per image,
``ap`` per query, OOD ``scores`` per image, ...); the functions here build the
:class:`~backbench.tasks.base.Resampler` of a record from them, so the report bootstraps the
metric without refitting. A statistic takes one int array ``(B, n_s)`` of resampled positions
per stratum and returns B float64 values. No Python loop runs over replicates: replicates are
processed in blocks of at most ``CELLS`` positions, so memory stays bounded for B = 1,000 and
n = 50,000.

Every statistic is written on *multiplicities* (the ``weighted`` form of the Resampler: how
often each original sample was drawn, one ``(B, n_s)`` float64 array per stratum, which the
report makes once for all backbones of a column); ``statistic`` on positions turns them into
multiplicities a block at a time. So scores are sorted once, never per replicate.
AUROC is the Mann-Whitney count of (positive, negative) pairs ranked right, a tie counting one
half (what scikit-learn's ``roc_auc_score`` computes); NMI is scikit-learn's
``normalized_mutual_info_score`` (arithmetic mean of the entropies) on the weighted
contingency table of the pairs (label, cluster) present.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from backbench.tasks.base import Record, Resampler

CELLS = 1 << 21  # positions (replicates x samples) processed at a time

Weighted = Callable[[Sequence[np.ndarray]], np.ndarray]


# --------------------------------------------------------------------------- helpers
def int_dtype(values: np.ndarray) -> np.dtype:
    """The smallest signed integer dtype holding every value of ``values`` exactly."""
    values = np.asarray(values)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def compact(values: Any) -> np.ndarray:
    """``values`` as integers in their smallest exact dtype (labels, predictions, ranks)."""
    values = np.asarray(values)
    return values.astype(int_dtype(values))


def _blocks(n_rows: int, width: int) -> list[slice]:
    """Slices of replicate rows, each at most ``CELLS`` positions wide in all."""
    step = max(1, CELLS // max(1, width))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def resampler(strata: Sequence[int], weighted: Weighted) -> Resampler:
    """The :class:`Resampler` of a statistic given on multiplicities: ``weighted`` gets one
    ``(B, n_s)`` float64 array per stratum; ``statistic`` turns positions into those a block
    of replicates at a time (memory bounded for any B)."""
    from backbench.probe.box_resample import multiplicities

    strata = tuple(int(n) for n in strata)

    def statistic(idx: Sequence[Any]) -> np.ndarray:
        b = int(np.asarray(idx[0]).shape[0])
        out = np.empty(b)
        for rows in _blocks(b, sum(strata)):
            out[rows] = weighted([multiplicities(np.asarray(i)[rows], n) for i, n in zip(idx, strata)])
        return out

    return Resampler(strata, statistic, weighted)


def parts(values: np.ndarray, sets: np.ndarray, n_sets: int) -> list[np.ndarray]:
    """``values`` split by their ``sets`` index 0 .. n_sets-1, each part in its original order."""
    sets = np.asarray(sets)
    return [np.asarray(values)[sets == j] for j in range(n_sets)]


def _mean(values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``weights (B, n) -> (B,)`` weighted means of ``values`` (each row of weights sums to n)."""
    values = np.asarray(values, dtype=np.float64)
    return lambda w: (w @ values) / len(values)


# --------------------------------------------------------------------------- the statistics
def accuracy(correct: np.ndarray) -> Resampler:
    """Mean of ``correct`` (top-1 accuracy; any per-sample mean, e.g. AP), one stratum."""
    mean = _mean(correct)
    return resampler((len(correct),), lambda w: mean(w[0]))


def mean_over_strata(values: Sequence[np.ndarray]) -> Resampler:
    """Mean over strata of each stratum's mean (e.g. accuracy averaged over shifted splits)."""
    means = [_mean(v) for v in values]
    return resampler([len(v) for v in values], lambda w: np.mean([m(x) for m, x in zip(means, w)], axis=0))


class WeightedAUROC:
    """AUROC of ``scores`` (``positive`` the class scored higher) under per-replicate sample
    multiplicities: the Mann-Whitney count of pairs ranked right, ties counted one half
    (integers, exact in float64)."""

    def __init__(self, scores: np.ndarray, positive: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        self.order = np.argsort(scores, kind="stable")
        ranked, positive = scores[self.order], np.asarray(positive, dtype=bool)[self.order]
        self.neg = self.order[~positive]  # negatives, ascending
        self.pos = self.order[positive]
        neg_ranked = ranked[~positive]
        # per positive: negatives strictly below it, and those below or tied with it
        self.low = np.searchsorted(neg_ranked, ranked[positive], side="left")
        self.high = np.searchsorted(neg_ranked, ranked[positive], side="right")

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """``weights (B, n)`` multiplicities in the original order -> ``(B,)`` AUROC (nan where a
        replicate lacks a class)."""
        out = np.empty(weights.shape[0])
        for rows in _blocks(weights.shape[0], weights.shape[1]):
            neg, pos = weights[rows][:, self.neg], weights[rows][:, self.pos]
            below = np.zeros((len(neg), neg.shape[1] + 1))
            np.cumsum(neg, axis=1, out=below[:, 1:])
            pairs = (pos * (below[:, self.low] + below[:, self.high])).sum(axis=1)  # twice the U statistic
            total = 2 * pos.sum(axis=1) * neg.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[rows] = np.where(total > 0, pairs / np.maximum(total, 1), np.nan)
        return out


def stratified_auroc(id_scores: np.ndarray, ood_scores: Sequence[np.ndarray]) -> Resampler:
    """Mean over OOD sets of AUROC(ID vs set j), ID the positive class; ID and each set are
    separate strata (resampled on their own)."""
    id_scores = np.asarray(id_scores, dtype=np.float64)
    aurocs = [WeightedAUROC(np.concatenate([id_scores, s]),
                            np.r_[np.ones(len(id_scores), bool), np.zeros(len(s), bool)]) for s in ood_scores]

    def weighted(w: Sequence[np.ndarray]) -> np.ndarray:
        return np.mean([a(np.hstack([w[0], wj])) for a, wj in zip(aurocs, w[1:])], axis=0)

    return resampler((len(id_scores), *(len(s) for s in ood_scores)), weighted)


def mean_label_auroc(scores: np.ndarray, targets: np.ndarray) -> Resampler:
    """Mean over labels (columns) of AUROC(targets, scores), rows resampled together; a label
    without both classes (in the data or in a replicate) or without scores (nan) is left out."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=bool)
    columns = [k for k in range(scores.shape[1])
               if np.isfinite(scores[:, k]).all() and 0 < targets[:, k].sum() < len(targets)]
    aurocs = [WeightedAUROC(scores[:, k], targets[:, k]) for k in columns]

    def weighted(w: Sequence[np.ndarray]) -> np.ndarray:
        per = np.stack([a(w[0]) for a in aurocs]) if aurocs else np.full((1, len(w[0])), np.nan)
        valid = np.isfinite(per)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(valid, per, 0).sum(axis=0) / valid.sum(axis=0)

    return resampler((len(scores),), weighted)


def _entropy(margin: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of class counts ``margin (B, K)`` summing to ``total (B,)``."""
    p = margin / total[:, None]
    return -(p * np.log(np.where(margin > 0, p, 1))).sum(axis=1)


class _GroupSum:
    """Sums of the columns of ``(B, n)`` arrays by a fixed ``group`` index per column (every
    group 0 .. max non-empty, as ``np.unique``'s inverse makes them): one sort, made once."""

    def __init__(self, group: np.ndarray) -> None:
        self.order = np.argsort(group, kind="stable")
        self.starts = np.searchsorted(group[self.order], np.arange(int(group.max()) + 1))

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return np.add.reduceat(w[:, self.order], self.starts, axis=1)


class WeightedNMI:
    """scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean of the entropies) of
    ``labels`` vs ``clusters`` under per-replicate sample multiplicities, from the contingency
    of the (label, cluster) pairs present (at most n cells, whatever the numbers of classes)."""

    def __init__(self, labels: np.ndarray, clusters: np.ndarray) -> None:
        _, lab = np.unique(labels, return_inverse=True)
        _, clu = np.unique(clusters, return_inverse=True)
        width = int(clu.max()) + 1
        codes, pair = np.unique(lab.astype(np.int64) * width + clu, return_inverse=True)
        self.pair_lab, self.pair_clu = codes // width, codes % width
        self.table, self.by_lab, self.by_clu = _GroupSum(pair), _GroupSum(self.pair_lab), _GroupSum(self.pair_clu)

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        out = np.empty(weights.shape[0])
        for rows in _blocks(weights.shape[0], weights.shape[1]):
            table = self.table(weights[rows])  # (b, pairs)
            a, b = self.by_lab(table), self.by_clu(table)
            total = table.sum(axis=1)
            outer = a[:, self.pair_lab] * b[:, self.pair_clu]
            cells = np.where(table > 0, table, 1)
            mi = np.clip((table / total[:, None] * np.log(cells * total[:, None] / np.where(table > 0, outer, 1)))
                         .sum(axis=1), 0.0, None)
            n_a, n_b = (a > 0).sum(axis=1), (b > 0).sum(axis=1)
            mi = np.where((n_a == 1) | (n_b == 1), 0.0, mi)  # one side a single class: MI is 0
            norm = (_entropy(a, total) + _entropy(b, total)) / 2
            with np.errstate(invalid="ignore", divide="ignore"):
                nmi = np.where(mi == 0, 0.0, mi / norm)
            out[rows] = np.where((n_a == 1) & (n_b == 1), 1.0, nmi)  # both single: scikit-learn says 1
        return out


def mean_nmi(labels: np.ndarray, assignments: np.ndarray) -> Resampler:
    """Mean over k-means seeds of NMI(labels, the seed's assignments), rows resampled together."""
    labels, assignments = np.asarray(labels), np.atleast_2d(np.asarray(assignments))
    nmis = [WeightedNMI(labels, a) for a in assignments]
    return resampler((len(labels),), lambda w: np.mean([nmi(w[0]) for nmi in nmis], axis=0))


def mean_recall(i2t_rank: np.ndarray, t2i_rank: np.ndarray, ks: Sequence[int]) -> Resampler:
    """Mean over ks and both directions of recall@k (rank < k); images and captions are
    separate strata."""
    hit = [_mean(np.mean([np.asarray(r) < int(k) for k in ks], axis=0)) for r in (i2t_rank, t2i_rank)]
    return resampler((len(i2t_rank), len(t2i_rank)), lambda w: (hit[0](w[0]) + hit[1](w[1])) / 2)


# --------------------------------------------------------------------------- per task (Task.resample)
def classification(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """probe, fewshot, knn, knn-fewshot, zeroshot: top-1 as the mean of ``correct``."""
    return accuracy(outcomes["correct"]) if "correct" in outcomes else None


def retrieval(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """retrieval: mAP as the mean of per-query ``ap`` (queries with a relevant item; exact index
    only: an approximate one records no mAP)."""
    return accuracy(outcomes["ap"]) if "ap" in outcomes else None


def ood(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """ood and open-set: mean over OOD sets of the primary score's AUROC."""
    if "scores" not in outcomes:
        return None
    split = parts(outcomes["scores"], outcomes["set"], len(record["outcome_sets"]) + 1)
    return stratified_auroc(split[0], split[1:])


def shift(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """shift: mean over shifted splits of accuracy."""
    if "correct" not in outcomes:
        return None
    return mean_over_strata(parts(outcomes["correct"], outcomes["set"], len(record["outcome_sets"])))


def multilabel(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """probe-multilabel: mean over scored labels of AUROC."""
    return mean_label_auroc(outcomes["scores"], outcomes["targets"]) if "scores" in outcomes else None


def clustering(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """clustering: mean over seeds of NMI (needs ``labels``, which older records lack)."""
    if "labels" not in outcomes or "assignments" not in outcomes:
        return None
    return mean_nmi(outcomes["labels"], outcomes["assignments"])


def text_retrieval(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """text-retrieval: mean recall over ks and both directions."""
    if "i2t_rank" not in outcomes:
        return None
    return mean_recall(outcomes["i2t_rank"], outcomes["t2i_rank"], record["params"]["ks"])
