"""The leaderboard's statistics against independent references: coverage of the bootstrap
intervals on simulated data with known truth, scipy's Friedman / Wilcoxon / Kendall, Holm by
statsmodels, and hand-computed aggregates."""

from __future__ import annotations

import numpy as np
import pytest

from backbench.report import stats as S
from backbench.report.leaderboard import build
from backbench.tasks.base import Resampler, Task, _TASKS, register


def accuracy(correct: np.ndarray, weighted: bool = False) -> Resampler:
    correct = np.asarray(correct, dtype=bool)
    return Resampler((len(correct),), lambda idx: correct[idx[0]].mean(axis=1),
                     (lambda w: w[0] @ correct / len(correct)) if weighted else None)


def test_the_weighted_form_gives_the_same_replicates():
    correct = np.random.default_rng(1).random(500) < 0.7
    seed = S.column_seed(0, "probe:d", (500,))
    np.testing.assert_allclose(S.replicates([accuracy(correct, True)], 300, seed),
                               S.replicates([accuracy(correct)], 300, seed), rtol=1e-12)


# --------------------------------------------------------------------------- coverage on simulated data
def test_cell_intervals_cover_the_truth_95_percent_of_the_time():
    """400 simulated eval sets of 400 samples at a known accuracy: the 95 % percentile bootstrap
    interval (1,000 resamples) covers the true accuracy in 93-97 % of them."""
    rng = np.random.default_rng(7)
    truth, covered = 0.8, 0
    for sim in range(400):
        r = accuracy(rng.random(400) < truth)
        low, high = S.percentile_interval(S.replicates([r], 1000, np.random.SeedSequence(sim)))
        covered += low <= truth <= high
    assert 0.93 <= covered / 400 <= 0.97


def test_a_pair_without_true_difference_is_called_different_about_5_percent_of_the_time():
    """Two backbones with the same true accuracy (independent errors), paired resamples: the
    interval of their difference excludes 0 in no more than ~5 % of 400 simulations."""
    rng = np.random.default_rng(11)
    different = 0
    for sim in range(400):
        a, b = accuracy(rng.random(400) < 0.7), accuracy(rng.random(400) < 0.7)
        seed = S.column_seed(sim, "probe:d", a.strata)  # the same positions for both: paired
        diff = S.replicates([a], 1000, seed) - S.replicates([b], 1000, seed)
        low, high = S.percentile_interval(diff)
        different += not (low <= 0 <= high)
    assert different / 400 <= 0.07


def test_replicates_are_paired_and_seeded():
    rng = np.random.default_rng(0)
    a, b = accuracy(rng.random(300) < 0.6), accuracy(rng.random(300) < 0.6)
    seed = S.column_seed(0, "probe:d", (300,))
    np.testing.assert_array_equal(S.replicates([a], 250, seed), S.replicates([a], 250, seed))
    # the same resampled positions: a backbone compared with itself differs by exactly 0
    np.testing.assert_array_equal(S.replicates([a], 250, seed) - S.replicates([a], 250, seed), 0)
    assert not np.array_equal(S.replicates([a], 250, seed), S.replicates([b], 250, seed))


def test_identity_resample_is_the_metric():
    correct = np.array([1, 0, 1, 1], dtype=bool)
    assert S.identity_value(accuracy(correct)) == 0.75


def test_seeds_are_resampled_with_samples():
    """Few-shot: with two seeds of accuracy 0 and 1 on every sample, replicates are 0, 0.5 or 1
    in proportions 1/4, 1/2, 1/4 (seeds drawn with replacement)."""
    zeros, ones = accuracy(np.zeros(50, bool)), accuracy(np.ones(50, bool))
    reps = S.replicates([zeros, ones], 4000, np.random.SeedSequence(3))
    assert set(np.unique(reps)) == {0.0, 0.5, 1.0}
    assert np.mean(reps == 0.5) == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------- aggregates by hand
V = np.array([[0.9, 0.2, 0.5],  # a
              [0.8, 0.6, 0.5],  # b
              [0.7, 0.5, 0.5]])  # c
TASK_OF = [0, 1, 0]  # probe:d1, retrieval:d1, probe:d2


def test_mean_rank_by_hand():
    # blocks: (1, 2, 3), (3, 1, 2), constant (2, 2, 2) -> means 2, 5/3, 7/3
    np.testing.assert_allclose(S.mean_rank(V), [2, 5 / 3, 7 / 3])


def test_iqm_of_min_max_normalised_scores_by_hand():
    from scipy.stats import trim_mean

    # column 1: (1, 0.5, 0); column 2: (0, 1, 0.75); column 3 constant: no normalised score
    np.testing.assert_allclose(S.iqm(V), [trim_mean([1, 0], 0.25), trim_mean([0.5, 1], 0.25),
                                          trim_mean([0, 0.75], 0.25)])


def test_zmean_matches_the_leaderboard():
    recs = [{"task": t, "backbone": b, "dataset": d, "metrics": {m: V[i, j]}, "params": {}, "seed": 0,
             "created": "2026"} for i, b in enumerate("abc")
            for j, (t, d, m) in enumerate([("probe", "d1", "top1"), ("retrieval", "d1", "mAP"), ("probe", "d2", "top1")])]
    lb = build(recs, bootstrap=0)
    cols = [lb.columns.index(c) for c in ("probe:d1", "retrieval:d1", "probe:d2")]
    np.testing.assert_allclose(S.zmean(V, TASK_OF, 2), lb.aggregate[[0, 1, 2]])
    assert lb.values[:, cols] == pytest.approx(V)


# --------------------------------------------------------------------------- a leaderboard with outcomes
@pytest.fixture
def toy_accuracy_task():
    """A registered task whose records keep ``correct`` arrays (removed again afterwards)."""
    task = register(Task("toy-acc", lambda *a: [], metric="top1",
                         resample=lambda record, out: accuracy(out["correct"])))
    yield task
    _TASKS.pop("toy-acc", None)


def _records(truth: dict[str, list[float]], n: int = 300, seed: int = 0):
    """Records of toy-acc on len(truth[b]) datasets with per-sample outcomes drawn at the true accuracies."""
    rng = np.random.default_rng(seed)
    recs, arrays = [], {}
    for b, accs in truth.items():
        for j, p in enumerate(accs):
            correct = rng.random(n) < p
            key = f"{b}-{j}"
            arrays[key] = {"correct": correct}
            recs.append({"task": "toy-acc", "backbone": b, "dataset": f"d{j}", "key": key,
                         "metrics": {"top1": float(correct.mean())}, "params": {}, "seed": 0,
                         "created": "2026", "outcomes": {"correct": {}}})
    return recs, lambda r: arrays[r["key"]]


def test_cells_ranks_and_pairwise_from_outcomes(toy_accuracy_task):
    truth = {"best": [0.9] * 6, "mid": [0.8, 0.78, 0.82, 0.8, 0.79, 0.81], "twin": [0.8, 0.81, 0.79, 0.8, 0.8, 0.8],
             "worst": [0.5] * 6}
    recs, outcomes = _records(truth)
    lb = build(recs, outcomes=outcomes, bootstrap=500)
    st = lb.stats
    cell = st.cells[("best", "toy-acc:d0")]
    assert cell.n == 300 and cell.low < cell.value < cell.high and cell.high - cell.low < 0.1
    assert st.rank["best"] == (1, 1, 1) and st.rank["worst"][0] == 4 == st.rank["worst"][2]
    low, high = st.rank["mid"][1:], st.rank["twin"][1:]
    assert low[0] <= 3 and low[1] >= 2 and high[0] <= 3  # mid and twin share ranks 2-3
    assert st.tied_with_first == ["best"]
    i = lb.backbones.index
    assert st.prob_beats[i("best"), i("worst")] == 1.0
    np.testing.assert_allclose(st.prob_beats + st.prob_beats.T, np.where(np.eye(4, dtype=bool), np.nan, 1.0))
    # Friedman over the 6 complete blocks and Wilcoxon + Holm, against scipy and statsmodels
    from scipy.stats import friedmanchisquare, wilcoxon
    from statsmodels.stats.multitest import multipletests

    assert st.friedman["pvalue"] == pytest.approx(friedmanchisquare(*lb.values).pvalue)
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    raw = [wilcoxon(lb.values[a], lb.values[b], zero_method="zsplit").pvalue for a, b in pairs]
    holm = multipletests(raw, method="holm")[1]
    for (a, b), p in zip(pairs, holm):
        assert st.posthoc[a, b] == pytest.approx(p)
    from scipy.stats import rankdata

    hand = np.mean([rankdata(-lb.values[:, j]) for j in range(6)], axis=0)
    assert [st.mean_ranks[b] for b in lb.backbones] == pytest.approx(hand)
    assert st.mean_ranks["worst"] == 4.0


def test_rank_interval_of_a_tie_and_json(toy_accuracy_task):
    recs, outcomes = _records({"a": [0.8, 0.8], "b": [0.8, 0.8]}, n=200, seed=3)
    lb = build(recs, outcomes=outcomes, bootstrap=400)
    data = lb.to_dict()
    assert {r["backbone"] for r in data["ranking"]} == {"a", "b"}
    assert all(r["rank_low"] == 1 and r["rank_high"] == 2 for r in data["ranking"])
    assert set(data["pairwise"]["not_separable_from_first"]) == {"a", "b"}
    cell = next(c for c in data["cells"] if c["backbone"] == "a" and c["dataset"] == "d0")
    assert cell["metric"] == "top1" and cell["n"] == 200 and cell["ci_low"] < cell["value"] < cell["ci_high"]
    assert "fewer than" not in str(data["pairwise"]["friedman"]) or data["pairwise"]["friedman"].get("note")


def test_old_records_without_outcomes_show_no_interval():
    recs = [{"task": "probe", "backbone": b, "dataset": "d", "metrics": {"top1": v}, "params": {}, "seed": 0,
             "created": "2026"} for b, v in (("a", 0.7), ("b", 0.6))]
    lb = build(recs, bootstrap=200)
    assert lb.stats.cells[("a", "probe:d")].low is None
    assert any("no per-sample outcomes" in n for n in lb.stats.notes)
    assert lb.stats.rank["a"] == (1, None, None)  # nothing resampled: no interval to show


def test_outcomes_that_disagree_with_the_record_give_no_interval(toy_accuracy_task):
    recs, outcomes = _records({"a": [0.8], "b": [0.6]}, n=100)
    recs[0]["metrics"]["top1"] = 0.99  # edited record: its arrays say otherwise
    lb = build(recs, outcomes=outcomes, bootstrap=100)
    assert lb.stats.cells[("a", "toy-acc:d0")].low is None
    assert any("outcome arrays give" in n for n in lb.stats.notes)


def test_aggregate_choice_ranks_and_bad_choice_is_refused():
    from backbench.errors import OptionError

    recs = [{"task": t, "backbone": b, "dataset": d, "metrics": {m: V[i, j]}, "params": {}, "seed": 0,
             "created": "2026"} for i, b in enumerate("abc")
            for j, (t, d, m) in enumerate([("probe", "d1", "top1"), ("retrieval", "d1", "mAP"), ("probe", "d2", "top1")])]
    by_rank = build(recs, aggregate="rank", bootstrap=50)
    assert [by_rank.backbones[i] for i in np.argsort(by_rank.rank)] == ["b", "a", "c"]  # 5/3 < 2 < 7/3
    assert by_rank.stats.score["b"].value == pytest.approx(5 / 3)
    with pytest.raises(OptionError, match="zmean, rank, iqm"):
        build(recs, aggregate="median")


def test_stability_names_the_task_whose_removal_reorders():
    from scipy.stats import kendalltau

    recs = [{"task": t, "backbone": b, "dataset": "d", "metrics": {m: v}, "params": {}, "seed": 0, "created": "2026"}
            for b, vals in {"a": (0.9, 0.1, 0.9), "b": (0.8, 0.9, 0.8), "c": (0.1, 0.2, 0.1)}.items()
            for (t, m), v in zip([("probe", "top1"), ("retrieval", "mAP"), ("knn", "top1")], vals)]
    lb = build(recs, bootstrap=0)
    st = S.stability(lb, "zmean", [lb.tasks.index(c.split(":")[0]) for c in lb.columns])
    assert st["task"] == "retrieval" and "removing `retrieval`" in st["sentence"]
    full = S.ranks_of(lb.aggregate)
    keep = [j for j, c in enumerate(lb.columns) if not c.startswith("retrieval")]
    loo = S.ranks_of(S.zmean(lb.values[:, keep], [0, 1], 2))
    assert st["min"] == pytest.approx(kendalltau(full, loo).statistic)


def test_column_ties_are_paired_differences_to_the_best(toy_accuracy_task):
    recs, outcomes = _records({"a": [0.9], "b": [0.9], "c": [0.5]}, n=400, seed=2)
    st = build(recs, outcomes=outcomes, bootstrap=300).stats
    assert set(st.column_ties["toy-acc:d0"]) == {"a", "b"}


def test_without_any_outcomes_there_are_no_degenerate_intervals():
    recs = [{"task": "probe", "backbone": b, "dataset": "d", "metrics": {"top1": v}, "params": {}, "seed": 0,
             "created": "2026"} for b, v in (("a", 0.7), ("b", 0.6))]
    data = build(recs, bootstrap=100).to_dict()
    assert all(r["rank_low"] is None and r["ci_low"] is None for r in data["ranking"])
