"""Per-sample outcomes and their resamplers (issue 23), task by task on real caches: the stored
outcomes reproduce the record's metrics, the identity resample is the record's main metric, and
resampled rows give what scikit-learn / numpy compute on the same rows."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix,
                             normalized_mutual_info_score, roc_auc_score)

import backbench
from backbench.probe import resample as R
from backbench.probe.box_resample import multiplicities
from backbench.probe.neighbour_tasks import run_knn, run_retrieval
from backbench.probe.ood_tasks import run_ood, run_open_set, run_shift
from backbench.probe.tasks import run_few_shot, run_probe
from backbench.store import Cache
from backbench.store.results import ResultsLog
from backbench.tasks.base import resampler
from conftest import put_group, write_image

B = "fake:pixels"
GRID = [0.1]


def outcomes_of(cache_path: str, record: dict) -> dict[str, np.ndarray]:
    """The record's outcome arrays as the report reads them (shape, dtype, SHA-256 checked)."""
    return ResultsLog(Cache(cache_path)).outcomes(record)


def check(record: dict, outcomes: dict, value: float, reference, replicates: int = 4, seed: int = 0):
    """The record's resampler: identity rows give ``value``; random rows give ``reference`` (one
    list of per-stratum positions -> the metric) per replicate; the weighted form agrees."""
    r = resampler(record, outcomes)
    assert r is not None
    assert r.statistic([np.arange(n)[None, :] for n in r.strata])[0] == pytest.approx(value, abs=1e-9)
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, n, size=(replicates, n)) for n in r.strata]
    got = r.statistic(idx)
    assert got.shape == (replicates,) and got.dtype == np.float64
    np.testing.assert_allclose(got, [reference([i[b] for i in idx]) for b in range(replicates)], atol=1e-9)
    weights = [multiplicities(i, n) for i, n in zip(idx, r.strata)]
    np.testing.assert_allclose(r.weighted(weights), got, atol=1e-12)
    return r


# --------------------------------------------------------------------------- classification
def test_probe_and_few_shot_keep_correct_and_predicted(digits_cache):
    cache = Cache(digits_cache)
    y = cache.group(B, "digits", "test").labels()
    rec, _ = run_probe(cache, B, "digits", "train", "test", Cs=GRID)
    out = outcomes_of(digits_cache, rec)
    assert out["correct"].dtype == bool and out["predicted"].dtype == np.int8 and out["correct"].shape == y.shape
    assert out["correct"].mean() == rec["metrics"]["top1"]
    np.testing.assert_array_equal(confusion_matrix(y, out["predicted"], labels=range(10)),
                                  rec["metrics"]["confusion_matrix"])
    check(rec, out, rec["metrics"]["top1"], lambda i: accuracy_score(y[i[0]], out["predicted"][i[0]]))
    pairs = run_few_shot(cache, B, "digits", "train", "test", shots=[2], seeds=2, Cs=GRID)
    for few, _ in pairs:
        out = outcomes_of(digits_cache, few)
        assert few["task"] == "fewshot" and out["correct"].mean() == few["metrics"]["top1"]
        check(few, out, few["metrics"]["top1"], lambda i: accuracy_score(y[i[0]], out["predicted"][i[0]]))


def test_knn_outcomes_are_at_the_main_k(digits_cache):
    cache = Cache(digits_cache)
    tr, te = cache.group(B, "digits", "train"), cache.group(B, "digits", "test")
    (rec, _), = run_knn(cache, B, "digits", "train", "test", ks=[1, 20])
    out = outcomes_of(digits_cache, rec)
    assert rec["metrics"]["main_k"] == 20 and out["correct"].mean() == rec["metrics"]["top1@20"]
    y = te.labels()
    np.testing.assert_array_equal(out["correct"], out["predicted"] == y)
    # an independent 20-NN vote (cosine, DINO's weights exp(sim / 0.07)) gives the same predictions
    Xtr, Xte = (g.features() / np.linalg.norm(g.features(), axis=1, keepdims=True) for g in (tr, te))
    sims = Xte @ Xtr.T
    near = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    votes = np.zeros((len(y), 10))
    np.add.at(votes, (np.repeat(np.arange(len(y)), 20), tr.labels()[near].ravel()),
              np.exp(np.take_along_axis(sims, near, 1) / 0.07).ravel())
    assert (votes.argmax(1) == out["predicted"]).mean() > 0.99  # float32 ties aside
    check(rec, out, rec["metrics"]["top1"], lambda i: accuracy_score(y[i[0]], out["predicted"][i[0]]))
    for few, _ in run_knn(cache, B, "digits", "train", "test", ks=[3], shots=[2], seeds=2):
        out = outcomes_of(digits_cache, few)
        assert few["task"] == "knn-fewshot" and out["correct"].mean() == few["metrics"]["top1"]
        check(few, out, few["metrics"]["top1"], lambda i: out["correct"][i[0]].mean())


# --------------------------------------------------------------------------- retrieval
def _sklearn_ap(q: np.ndarray, qy: np.ndarray, g: np.ndarray, gy: np.ndarray, row: int, exclude: bool) -> float:
    sims = (q[row] / np.linalg.norm(q[row])) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    keep = np.arange(len(g)) != row if exclude else np.ones(len(g), bool)
    return average_precision_score(gy[keep] == qy[row], sims[keep])


@pytest.mark.parametrize("gallery", ["test", "train"])
def test_retrieval_keeps_per_query_ap(digits_cache, gallery):
    cache = Cache(digits_cache)
    rec, _ = run_retrieval(cache, B, "digits", "test", gallery, ks=[1, 5])
    out = outcomes_of(digits_cache, rec)
    m = rec["metrics"]
    assert out["ap"].dtype == np.float64 and len(out["ap"]) == m["n_queries"]
    assert out["ap"].mean() == pytest.approx(m["mAP"], abs=1e-12)
    assert (1 / (out["first_hit"] + 1)).mean() == pytest.approx(m["MRR"], abs=1e-12)
    assert (out["first_hit"] == 0).mean() == pytest.approx(m["precision@1"], abs=1e-12)
    q, g = cache.group(B, "digits", "test"), cache.group(B, "digits", gallery)
    for j in (0, 7, 100):
        row = int(out["query"][j])
        want = _sklearn_ap(q.features(), q.labels(), g.features(), g.labels(), row, gallery == "test")
        assert out["ap"][j] == pytest.approx(want, abs=1e-9)
    check(rec, out, m["mAP"], lambda i: out["ap"][i[0]].mean())


def test_approximate_retrieval_has_no_map_to_resample(digits_cache):
    rec, _ = run_retrieval(Cache(digits_cache), B, "digits", "test", "train", ks=[1], index="ivf")
    out = outcomes_of(digits_cache, rec)
    K = next(k for k in rec["metrics"] if k.startswith("mAP@"))
    assert "ap" not in out and out["ap_topk"].mean() == pytest.approx(rec["metrics"][K], abs=1e-12)
    assert resampler(rec, out) is None


# --------------------------------------------------------------------------- ood, open-set, shift
@pytest.fixture
def ood_cache(digits_cache):
    rng = np.random.default_rng(3)
    test = Cache(digits_cache).group(B, "digits", "test")
    X, y = test.features(), test.labels()
    put_group(digits_cache, B, "noise", "test", rng.normal(8, 6, (150, X.shape[1])).astype(np.float32),
              np.zeros(150, dtype=np.int64), ["noise"])
    put_group(digits_cache, B, "blur", "test", (X[:120] + rng.normal(0, 4, X[:120].shape)).astype(np.float32),
              np.zeros(120, dtype=np.int64), ["blur"])
    keep = y < 3  # a shifted set with a subset of the classes, in another order
    put_group(digits_cache, B, "digits_shift", "test", X[keep] + rng.normal(0, 2, X[keep].shape).astype(np.float32),
              2 - y[keep], ["2", "1", "0"])
    put_group(digits_cache, B, "digits_noisy", "test", X + rng.normal(0, 5, X.shape).astype(np.float32), y)
    return digits_cache


def _auroc(id_scores, ood_scores) -> float:
    return roc_auc_score(np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))], np.r_[id_scores, ood_scores])


def test_ood_keeps_the_primary_scores_per_set(ood_cache):
    rec, _ = run_ood(Cache(ood_cache), B, "digits", "train", "test", ood=["noise:test", "blur:test"],
                     scores=["knn", "msp"])
    out = outcomes_of(ood_cache, rec)
    assert rec["outcome_sets"] == ["noise:test", "blur:test"] and out["set"].dtype == np.int16
    assert np.bincount(out["set"]).tolist() == [497, 150, 120]
    s = [out["scores"][out["set"] == j] for j in range(3)]
    per = rec["metrics"]["scores"]["knn"]
    assert _auroc(s[0], s[1]) == per["noise:test"]["auroc"] and _auroc(s[0], s[2]) == per["blur:test"]["auroc"]
    r = check(rec, out, rec["metrics"]["auroc"],
              lambda i: np.mean([_auroc(s[0][i[0]], s[j][i[j]]) for j in (1, 2)]))
    assert r.strata == (497, 150, 120)


def test_open_set_keeps_id_and_held_out_scores(ood_cache):
    rec, _ = run_open_set(Cache(ood_cache), B, "digits", "train", "test", holdout=["8", "9"], scores=["msp"])
    out = outcomes_of(ood_cache, rec)
    s = [out["scores"][out["set"] == j] for j in range(2)]
    assert rec["outcome_sets"] == ["held-out"] and [len(x) for x in s] == [rec["metrics"]["n_id"],
                                                                          rec["metrics"]["n_ood"]]
    assert _auroc(*s) == rec["metrics"]["auroc"]  # msp: the first score when knn is not asked
    check(rec, out, rec["metrics"]["auroc"], lambda i: _auroc(s[0][i[0]], s[1][i[1]]))


def test_shift_keeps_correct_per_shifted_split(ood_cache):
    rec, _ = run_shift(Cache(ood_cache), B, ("digits", "train"), ("digits", "test"),
                       [("digits_shift", "test"), ("digits_noisy", "test")])
    out = outcomes_of(ood_cache, rec)
    m = rec["metrics"]
    assert rec["outcome_sets"] == ["digits_shift:test", "digits_noisy:test"]
    c = [out["correct"][out["set"] == j] for j in range(2)]
    assert [x.mean() for x in c] == [m["shifted"][k]["top1"] for k in rec["outcome_sets"]]
    ys = Cache(ood_cache).group(B, "digits_shift", "test").labels()
    np.testing.assert_array_equal(c[0], out["predicted"][out["set"] == 0] == 2 - ys)  # train codes
    check(rec, out, m["shifted_top1"], lambda i: np.mean([c[j][i[j]].mean() for j in range(2)]))


# --------------------------------------------------------------------------- multi-label
def test_multilabel_keeps_scores_and_targets(cache_path):
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    targets = np.stack([y < 5, y % 2 == 1, np.isin(y, [0, 6, 8, 9])], 1)
    masks = (targets.astype(np.int64) << np.arange(3)).sum(1)
    for split, rows in (("train", slice(0, 1000)), ("test", slice(1000, None))):
        put_group(cache_path, B, "digits3", split, X[rows], masks[rows], ["small", "odd", "round"], multilabel=True)
    rec, _ = run_probe(Cache(cache_path, mode="r+"), B, "digits3", "train", "test", Cs=GRID)
    out = outcomes_of(cache_path, rec)
    S, T = out["scores"], out["targets"]
    assert S.shape == T.shape == (797, 3) and T.dtype == bool and S.dtype == np.float64
    np.testing.assert_array_equal(T, targets[1000:])
    for k, name in enumerate(["small", "odd", "round"]):
        assert roc_auc_score(T[:, k], S[:, k]) == rec["metrics"]["auroc"][name]
    check(rec, out, rec["metrics"]["mean_auroc"],
          lambda i: np.mean([roc_auc_score(T[i[0], k], S[i[0], k]) for k in range(3)]))


def test_a_label_without_both_classes_in_a_replicate_is_left_out():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.3], [0.1, 0.6]])
    targets = np.array([[1, 1], [1, 0], [0, 0], [0, 1]], dtype=bool)
    r = R.mean_label_auroc(scores, targets)
    rows = np.array([[0, 1, 2, 3], [1, 1, 2, 2], [1, 1, 1, 1]])  # label 1 one class in row 2, both labels in row 3
    got = r.statistic([rows])
    assert got[0] == pytest.approx(np.mean([roc_auc_score(targets[:, k], scores[:, k]) for k in range(2)]))
    assert got[1] == pytest.approx(roc_auc_score(targets[[1, 1, 2, 2], 0], scores[[1, 1, 2, 2], 0]))
    assert np.isnan(got[2])


# --------------------------------------------------------------------------- clustering
def test_clustering_keeps_labels_and_resamples_nmi(cache_path):
    X, y = make_blobs(n_samples=500, centers=5, n_features=8, cluster_std=4.0, random_state=0)
    put_group(cache_path, "fake:blobs", "blobs", "test", X.astype(np.float32), y)
    rec = backbench.cluster("fake:blobs", "blobs", eval="test", seeds=3, cache=cache_path, device="cpu").record
    out = outcomes_of(cache_path, rec)
    labels, assignments = out["labels"], out["assignments"]
    assert labels.dtype == np.int8 and assignments.shape == (3, 500)
    np.testing.assert_array_equal(labels, y)
    assert np.mean([normalized_mutual_info_score(labels, a) for a in assignments]) == pytest.approx(
        rec["metrics"]["nmi"], abs=1e-12)
    r = check(rec, out, rec["metrics"]["nmi"],
              lambda i: np.mean([normalized_mutual_info_score(labels[i[0]], a[i[0]]) for a in assignments]))
    idx = [np.random.default_rng(1).integers(0, 500, size=(1000, 500))]
    started = time.perf_counter()
    assert np.isfinite(r.statistic(idx)).all()
    assert time.perf_counter() - started < 5


def test_nmi_limit_cases_are_scikit_learns():
    labels, clusters = np.array([0, 0, 1, 1, 2]), np.array([3, 3, 3, 1, 1])
    nmi = R.WeightedNMI(labels, clusters)
    for rows in ([0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 2, 4, 4, 2], [0, 3, 0, 3, 3], [2, 3, 4, 0, 1]):
        w = multiplicities(np.array([rows]), 5)
        assert nmi(w)[0] == pytest.approx(normalized_mutual_info_score(labels[rows], clusters[rows]), abs=1e-12)


# --------------------------------------------------------------------------- AUROC with ties, blocks
def test_weighted_auroc_handles_ties_as_scikit_learn():
    rng = np.random.default_rng(5)
    scores, positive = rng.integers(0, 4, 60).astype(float), rng.random(60) < 0.4
    auroc = R.WeightedAUROC(scores, positive)
    rows = rng.integers(0, 60, size=(20, 60))
    want = [roc_auc_score(positive[r], scores[r]) for r in rows]
    np.testing.assert_allclose(auroc(multiplicities(rows, 60)), want, atol=1e-12)


def test_blocks_of_replicates_give_the_same_values(monkeypatch):
    rng = np.random.default_rng(2)
    r = R.stratified_auroc(rng.normal(1, 1, 300), [rng.normal(0, 1, 200)])
    idx = [rng.integers(0, n, size=(50, n)) for n in r.strata]
    whole = r.statistic(idx)
    monkeypatch.setattr(R, "CELLS", 700)
    np.testing.assert_array_equal(r.statistic(idx), whole)


# --------------------------------------------------------------------------- zero-shot and text retrieval
CLIP = "open_clip:ViT-S-32@random"


def test_zeroshot_resamples_its_accuracy(tmp_path):
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(4):
            write_image(tmp_path / "images" / name / f"{i}.png", seed=10 * c + i)
    path = str(tmp_path / "f.zarr")
    backbench.extract(CLIP, f"imagefolder:{tmp_path / 'images'}", cache=path, dataset="toy", split="test",
                      workers=0, dtype="float32", device="cpu")
    rec = backbench.zeroshot(CLIP, "toy", eval="test", templates=["a photo of a {c}."], cache=path,
                             device="cpu").record
    out = outcomes_of(path, rec)
    y = Cache(path).group(CLIP, "toy", "test").labels()
    assert out["predicted"].dtype == np.int8 and out["correct"].mean() == rec["metrics"]["top1"]
    check(rec, out, rec["metrics"]["top1"], lambda i: accuracy_score(y[i[0]], out["predicted"][i[0]]))


def test_text_retrieval_resamples_images_and_captions_apart(tmp_path):
    import json

    words = ["cat", "dog", "eel", "fox", "owl"]
    rows = []
    for i, w in enumerate(words):
        write_image(tmp_path / "img" / f"{w}.png", seed=i)
        rows.append({"image": f"img/{w}.png", "caption": [f"a photo of a {w}.", f"a {w} outdoors"]})
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = str(tmp_path / "f.zarr")
    backbench.extract(CLIP, f"captions:{tmp_path / 'caps.jsonl'}", cache=path, dataset="caps", split="test",
                      workers=0, dtype="float32", device="cpu")
    rec = backbench.text_retrieval(CLIP, "caps", split="test", ks=[1, 2], cache=path, device="cpu").record
    out = outcomes_of(path, rec)
    i2t, t2i = out["i2t_rank"], out["t2i_rank"]
    assert i2t.dtype == t2i.dtype == np.int8

    def recall(i):
        return np.mean([(i2t[i[0]] < k).mean() for k in (1, 2)] + [(t2i[i[1]] < k).mean() for k in (1, 2)])

    r = check(rec, out, rec["metrics"]["mean_recall"], recall)
    assert r.strata == (5, 10)


# --------------------------------------------------------------------------- old records
def test_a_record_without_outcomes_is_reused_and_has_no_resampler(digits_cache):
    cache = Cache(digits_cache)
    rec, _ = run_probe(cache, B, "digits", "train", "test", Cs=GRID)
    old = {k: v for k, v in rec.items() if k != "outcomes"}
    ResultsLog(cache).put(old)  # as written before outcomes were kept: the same key
    again, reused = run_probe(cache, B, "digits", "train", "test", Cs=GRID)
    assert reused and again["key"] == rec["key"] and "outcomes" not in again
    assert outcomes_of(digits_cache, again) == {} and resampler(again, {}) is None
    assert resampler({"task": "clustering"}, {"assignments": np.zeros((1, 3), np.int32)}) is None


def test_knn_eval_outcomes_need_one_of_its_ks():
    from backbench.errors import ProbeInputError
    from backbench.probe.knn import knn_eval

    X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    y = np.arange(20) % 2
    with pytest.raises(ProbeInputError, match="outcomes_at=7 must be one of ks"):
        knn_eval(X, y, X, y, ks=(1, 5), outcomes_at=7)


def test_streamed_splits_keep_the_same_outcomes(digits_cache):
    """Above the memory limit kNN and retrieval read the cache block by block: same outcomes."""
    cache = Cache(digits_cache)
    (knn, _), = run_knn(cache, B, "digits", "train", "test", ks=[5])
    ret, _ = run_retrieval(cache, B, "digits", "test", "train", ks=[1])
    (knn_s, _), = run_knn(cache, B, "digits", "train", "test", ks=[5], memory_limit=1, force=True)
    ret_s, _ = run_retrieval(cache, B, "digits", "test", "train", ks=[1], memory_limit=1, force=True)
    for a, b in ((knn, knn_s), (ret, ret_s)):
        assert b["key"] == a["key"] and b["outcomes"] == a["outcomes"]  # the same arrays (SHA-256)
