"""kNN classification and retrieval on feature arrays, checked against scikit-learn and by hand."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from backbench.errors import ProbeInputError
from backbench.probe.knn import Int8FlatIndex, KNNClassifier, knn_eval
from backbench.probe.retrieval import _drop_self, build_index, retrieval_metrics


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def clusters(n: int, d: int = 16, n_classes: int = 5, noise: float = 1.0, seed: int = 0):
    """Gaussian class clusters (same centers for every seed); continuous, so no similarity ties."""
    centers = np.random.default_rng([d, n_classes]).standard_normal((n_classes, d)) * 2
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    return (centers[y] + noise * rng.standard_normal((n, d))).astype(np.float32), y


def unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def dino_vote(train_X, train_y, X, k: int, T: float, n_classes: int) -> np.ndarray:
    """DINO's weighted kNN vote written out directly in numpy."""
    sims = unit(X) @ unit(train_X).T
    nn = np.argsort(-sims, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sims, nn, axis=1) / T)
    votes = np.zeros((len(X), n_classes))
    for j in range(k):
        votes[np.arange(len(X)), train_y[nn[:, j]]] += w[:, j]
    return votes


# --------------------------------------------------------------------------- kNN


def test_kneighbors_match_sklearn_cosine_brute():
    X, y = clusters(400, seed=1)
    Q, _ = clusters(60, seed=2)
    sims, idx = KNNClassifier(k=10).fit(X, y).kneighbors(Q)
    dist, ref = NearestNeighbors(n_neighbors=10, metric="cosine", algorithm="brute").fit(X).kneighbors(Q)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(sims, 1 - dist, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_predictions_match_numpy_dino_vote(digits):
    X, y = digits
    clf = KNNClassifier(k=20, temperature=0.07).fit(X[:1400], y[:1400])
    votes = dino_vote(X[:1400], y[:1400], X[1400:], 20, 0.07, 10)
    np.testing.assert_array_equal(clf.predict(X[1400:]), votes.argmax(1))
    np.testing.assert_allclose(clf.predict_proba(X[1400:]), votes / votes.sum(1, keepdims=True), atol=1e-6)
    assert clf.score(X[1400:], y[1400:]) == pytest.approx(np.mean(votes.argmax(1) == y[1400:]))


def test_uniform_vote_matches_sklearn_majority():
    X, y = clusters(500, noise=2.5, seed=3)
    Q, _ = clusters(200, noise=2.5, seed=4)
    ours = KNNClassifier(k=15, weights="uniform").fit(X, y).predict(Q)
    ref = KNeighborsClassifier(15, algorithm="brute", metric="cosine").fit(X, y).predict(Q)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("search", ["auto", "exact"])
def test_string_labels_and_estimator_contract(digits, search):
    X, y = digits
    names = np.array(list("abcdefghij"))[y]
    clf = KNNClassifier(k=5, search=search)
    assert clf.fit(X[:500], names[:500]) is clf
    assert set(clf.predict(X[500:600])) <= set(clf.classes_)
    assert clf.n_features_in_ == 64 and clf.n_samples_fit_ == 500
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict(X[500:600]), clf.predict(X[500:600]))


def test_chunked_float16_and_zarr_inputs_agree(tmp_path, digits):
    import zarr

    X, y = digits
    X16 = X.astype(np.float16)
    ref = KNNClassifier(k=10).fit(X16[:1200], y[:1200]).kneighbors(X16[1200:])
    small = KNNClassifier(k=10, batch_size=7).fit(X16[:1200], y[:1200]).kneighbors(X16[1200:])
    z = zarr.create_array(store=str(tmp_path / "f.zarr"), shape=X16.shape, chunks=(256, 64), dtype="float16")
    z[:] = X16
    from_zarr = KNNClassifier(k=10, batch_size=300).fit(z[:1200], y[:1200]).kneighbors(z)
    for got in (small, (from_zarr[0][1200:], from_zarr[1][1200:])):
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
    assert not np.shares_memory(X, KNNClassifier(k=1).fit(X, y).kneighbors(X)[0])
    np.testing.assert_array_equal(X, digits[0])  # inputs are never normalized in place


def test_knn_eval_multiple_k_equals_separate_runs(digits):
    X, y = digits
    args = (X[:1300], y[:1300], X[1300:], y[1300:])
    together = knn_eval(*args, ks=(1, 5, 20, 100), batch_size=50)
    for k in (1, 5, 20, 100):
        alone = knn_eval(*args, ks=(k,))
        assert together[f"top1@{k}"] == alone[f"top1@{k}"]
        assert together[f"top5@{k}"] == alone[f"top5@{k}"]
        score = KNNClassifier(k=k).fit(X[:1300], y[:1300]).score(X[1300:], y[1300:])
        assert together[f"top1@{k}"] == pytest.approx(score)
        assert together[f"top1@{k}"] <= together[f"top5@{k}"]
    assert (together["n_train"], together["n_eval"], together["n_classes"]) == (1300, 497, 10)


def test_knn_eval_top5_and_clipping_by_hand():
    X, y = clusters(30, n_classes=8, seed=5)
    Q, qy = clusters(40, n_classes=8, seed=6)
    res = knn_eval(X, y, Q, qy, ks=(3, 1000), temperature=0.1, n_classes=8)
    for k in (3, 30):
        votes = dino_vote(X, y, Q, k, 0.1, 8)
        order = np.argsort(-votes, axis=1, kind="stable")[:, :5]
        top5 = np.mean([qy[i] in order[i][votes[i, order[i]] > 0] for i in range(len(Q))])
        key = 3 if k == 3 else 1000  # k beyond the train size is clipped to it
        assert res[f"top1@{key}"] == pytest.approx(np.mean(votes.argmax(1) == qy))
        assert res[f"top5@{key}"] == pytest.approx(top5)


def test_fast_search_equals_exact_search():
    X, y = clusters(6000, d=48, n_classes=10, noise=2.0, seed=13)  # enough rows for grouped top-k
    Q, _ = clusters(500, d=48, n_classes=10, noise=2.0, seed=14)
    fast = KNNClassifier(k=10, batch_size=128).fit(X, y)
    exact = KNNClassifier(k=10, search="exact").fit(X, y)
    assert isinstance(fast.index_, Int8FlatIndex) and not isinstance(exact.index_, Int8FlatIndex)
    (fs, fi), (es, ei) = fast.kneighbors(Q), exact.kneighbors(Q)
    np.testing.assert_array_equal(np.sort(fi, axis=1), np.sort(ei, axis=1))
    np.testing.assert_allclose(fs, es, atol=1e-6)  # equal up to float32 summation order,
    assert np.mean(fi == ei) > 0.999  # which may swap the order of near-ties
    assert fast.index_.n_queries == 500 and fast.index_.n_redone < 50  # the int8 pass decided most
    np.testing.assert_allclose(fast.predict_proba(Q), exact.predict_proba(Q), rtol=1e-5, atol=1e-9)
    args = (X[:2500], y[:2500], X[2500:], y[2500:])
    assert knn_eval(*args, ks=(1, 20)) == knn_eval(*args, ks=(1, 20), search="exact")


def test_int8_candidates_are_the_top_scores():
    import torch

    scores = torch.randint(-1000, 1000, (50, 32 * 300), dtype=torch.int32)
    for n_cand in (40, 80):  # grouped, and plain top-k
        top, cols = Int8FlatIndex._candidates(scores, n_cand)
        ref = torch.topk(scores, n_cand, dim=1).values
        np.testing.assert_array_equal(top.sort(dim=1).values, ref.sort(dim=1).values)
        np.testing.assert_array_equal(torch.gather(scores, 1, cols), top)
        assert all(len(set(row)) == n_cand for row in cols.tolist())


def test_fast_search_falls_back_where_int8_cannot_rank():
    rng = np.random.default_rng(15)
    base = rng.standard_normal(32).astype(np.float32)
    X = base + 0.03 * rng.standard_normal((600, 32), dtype=np.float32)  # cosines within ~1e-3,
    X[:300] = rng.standard_normal((300, 32))  # finer than int8 rounding can rank
    Q = base + 0.03 * rng.standard_normal((40, 32), dtype=np.float32)
    fast = KNNClassifier(k=10).fit(X, np.arange(600) % 3)
    ref = np.argsort(-(unit(Q) @ unit(X).T), axis=1)[:, :10]
    np.testing.assert_array_equal(np.sort(fast.kneighbors(Q)[1], axis=1), np.sort(ref, axis=1))
    assert fast.index_.n_redone == 40  # every query was searched again exactly
    sims, _ = fast.kneighbors(np.zeros((2, 32)), k=3)
    np.testing.assert_array_equal(sims, 0)


def test_knn_input_errors(digits):
    X, y = digits
    with pytest.raises(ProbeInputError):
        KNNClassifier().fit(X, y[:-1])
    with pytest.raises(ProbeInputError):
        KNNClassifier().fit(X[:100], y[:100]).predict(X[:5, :10])
    with pytest.raises(ProbeInputError):
        knn_eval(X, y, X, y, ks=(5,), n_classes=3)
    with pytest.raises(ProbeInputError):
        KNNClassifier(search="approximate").fit(X, y)


# --------------------------------------------------------------------------- retrieval


def test_tiny_case_by_hand():
    angles = np.deg2rad([0, 10, 20, 30, 40])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    g_y = np.array([1, 0, 1, 0, 0])
    query = np.array([[1.0, 0.0], [2.0, 0.0]])
    q_y = np.array([1, 0])  # rankings: items 0..4; relevant [1,0,1,0,0] and [0,1,0,1,1]
    res = retrieval_metrics(query, q_y, gallery, g_y, ks=(1, 3, 5), topk=5)
    ap = [(1 / 1 + 2 / 3) / 2, (1 / 2 + 2 / 4 + 3 / 5) / 3]
    assert res["mAP"] == pytest.approx(np.mean(ap))
    assert res["mAP@5"] == pytest.approx(np.mean(ap))
    assert res["MRR"] == pytest.approx((1 + 1 / 2) / 2)
    assert res["precision@1"] == pytest.approx(0.5)
    assert res["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert res["precision@5"] == pytest.approx((2 / 5 + 3 / 5) / 2)
    assert (res["recall@1"], res["recall@3"]) == (0.5, 1.0)
    assert (res["n_queries"], res["n_queries_no_relevant"], res["index"]) == (2, 0, "flat")
    top2 = retrieval_metrics(query, q_y, gallery, g_y, ks=(1,), topk=2)
    assert top2["mAP@2"] == pytest.approx((1 / 1 / 2 + (1 / 2) / 2) / 2)  # AP@2 / min(R, 2)


def test_average_precision_equals_sklearn_per_query():
    X, y = clusters(300, n_classes=4, noise=3.0, seed=7)
    Q, qy = clusters(25, n_classes=4, noise=3.0, seed=8)
    sims = unit(Q) @ unit(X).T
    aps = [average_precision_score(y == qy[i], sims[i]) for i in range(len(Q))]
    for i in range(5):
        assert retrieval_metrics(Q[i:i + 1], qy[i:i + 1], X, y)["mAP"] == pytest.approx(aps[i])
    assert retrieval_metrics(Q, qy, X, y)["mAP"] == pytest.approx(np.mean(aps))


def test_exclude_self_never_retrieves_the_query():
    X, _ = clusters(120, seed=9)
    y = np.random.default_rng(0).permutation(np.arange(120) // 2)  # each label on two random rows
    sims = unit(X) @ unit(X).T
    aps, firsts = [], []
    for i in range(len(X)):
        others = np.arange(len(X)) != i
        aps.append(average_precision_score(y[others] == y[i], sims[i, others]))
        order = np.argsort(-sims[i, others])
        firsts.append(1 / (1 + np.flatnonzero(y[others][order] == y[i])[0]))
    for index in ("flat", "ivf", "hnsw"):
        res = retrieval_metrics(X, y, X, y, exclude_self=True, index=index, ks=(1,), topk=119, nprobe=1000)
        assert res["precision@1"] < 0.5  # were the query itself retrieved, this would be 1.0
        assert res[f"mAP@119"] == pytest.approx(np.mean(aps), abs=0.02 if index == "hnsw" else 1e-6)
    assert res["n_queries"] == 120
    exact = retrieval_metrics(X, y, X, y, exclude_self=True, ks=(1,))
    assert exact["mAP"] == pytest.approx(np.mean(aps))
    assert exact["MRR"] == pytest.approx(np.mean(firsts))
    np.testing.assert_array_equal(_drop_self(np.array([[3, 5, 7], [2, 4, 6]]), np.array([5, 9])),
                                  [[3, 7], [2, 4]])
    with pytest.raises(ProbeInputError):
        retrieval_metrics(X[:10], y[:10], X, y, exclude_self=True)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_chunked_equals_unchunked(digits, index):
    X, y = digits
    gallery = build_index(X[300:], index=index)
    small = retrieval_metrics(X[:300], y[:300], gallery, y[300:], batch_size=7, nprobe=4)
    large = retrieval_metrics(X[:300], y[:300], gallery, y[300:], batch_size=100_000, nprobe=4)
    assert small.keys() == large.keys()
    for key, value in large.items():
        assert small[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_build_index_from_chunk_iterator(digits):
    X, y = digits
    whole = build_index(X[300:])
    chunked = build_index(iter([X[300:700], X[700:1000], X[1000:]]))
    assert chunked.ntotal == whole.ntotal == len(X) - 300
    assert retrieval_metrics(X[:300], y[:300], chunked, y[300:]) == retrieval_metrics(X[:300], y[:300], whole, y[300:])
    ivf = build_index((X[i:i + 200] for i in range(300, len(X), 200)), index="ivf", n_total=len(X) - 300)
    assert ivf.ntotal == len(X) - 300 and ivf.nlist == 38


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_report_recall_vs_exact(index):
    X, y = clusters(2000, d=32, n_classes=10, noise=0.3, seed=10)
    Q, qy = clusters(200, d=32, n_classes=10, noise=0.3, seed=11)
    exact = retrieval_metrics(Q, qy, X, y, ks=(1, 10), topk=20)
    easy = retrieval_metrics(Q, qy, X, y, ks=(1, 10), topk=20, index=index, nprobe=16, ef_search=128)
    assert 0.95 <= easy["recall_vs_exact"] <= 1.0 and easy["index"] == index
    assert easy["precision@10"] == pytest.approx(exact["precision@10"], abs=0.01)
    assert easy["mAP@20"] == pytest.approx(exact["mAP@20"], abs=0.02) and "MRR@20" in easy and "mAP" not in easy
    hard, hy = clusters(2000, d=32, n_classes=10, noise=3.0, seed=12)
    rough = retrieval_metrics(hard[:200], hy[:200], hard[200:], hy[200:], topk=20, index=index,
                              nprobe=1, ef_search=1)
    assert 0.0 <= rough["recall_vs_exact"] < 1.0
