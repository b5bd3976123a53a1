"""OOD scores and metrics: known Gaussian answers, pytorch-ood's detectors, numpy transcriptions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.base import clone

from backbench.errors import ProbeInputError
from backbench.probe import ood
from backbench.probe.linear import LinearProbe
from backbench.probe.ood_metrics import ood_metrics

D, N_CLASSES = 16, 5


def clusters(n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around fixed centers (the same for every seed); float32 like a cache."""
    centers = np.random.default_rng(123).standard_normal((N_CLASSES, D)) * 2 + 1
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    return (centers[y] + scale * rng.standard_normal((n, D))).astype(np.float32), y


@pytest.fixture(scope="module")
def data() -> dict:
    X, y = clusters(300, seed=0)
    ID, _ = clusters(50, seed=1)
    OOD = (np.random.default_rng(2).standard_normal((50, D)) * 3).astype(np.float32)
    probe = LinearProbe(C=1.0).fit(X, y)
    return {"X": X, "y": y, "Q": np.vstack([ID, OOD]), "probe": probe, "n_id": len(ID)}


class RowsOnly:
    """A feature source that only slices by rows (as a Zarr array read chunk by chunk)."""

    def __init__(self, X: np.ndarray) -> None:
        self.X, self.shape, self.reads = X, X.shape, 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        assert isinstance(rows, slice)
        self.reads += 1
        return self.X[rows]


def all_scorers(probe, **common) -> dict[str, ood._Scorer]:
    """One scorer per name in SCORES, small enough for the test data, built on the fitted ``probe``.

    (``sklearn.clone`` would clone the probe too, unfitted: build afresh instead.)
    """
    params = {"msp": {"probe": probe}, "maxlogit": {"probe": probe}, "energy": {"probe": probe},
              "knn": {"k": 10}, "vim": {"dim": 8, "probe": probe}}
    return {name: ood.make_scorer(name, **params.get(name, {}), **common) for name in ood.SCORES}


# --------------------------------------------------------------------------- metrics


def test_metrics_match_gaussian_theory():
    rng = np.random.default_rng(0)
    n = 400_000
    m = ood_metrics(rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n))
    assert set(m) == {"auroc", "aupr_in", "aupr_out", "fpr@95tpr"}
    assert m["auroc"] == pytest.approx(norm.cdf(1 / np.sqrt(2)), abs=0.01)  # 0.760
    assert m["fpr@95tpr"] == pytest.approx(norm.cdf(norm.ppf(0.95) - 1), abs=0.01)  # 0.741
    assert m["aupr_in"] == pytest.approx(m["aupr_out"], abs=0.01)  # symmetric problem


def test_metrics_small_cases_by_hand():
    perfect = ood_metrics([3.0, 4.0], [1.0, 2.0])
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr@95tpr": 0.0}
    # 20 ID scores 1..20, OOD 0.5..10.5: TPR 0.95 first at threshold 2 (19 of 20), where 9 of 11 OOD pass
    m = ood_metrics(np.arange(1, 21.0), np.arange(0.5, 11.0))
    assert m["fpr@95tpr"] == pytest.approx(9 / 11)
    assert ood_metrics([0.0], [1.0])["auroc"] == 0.0
    with pytest.raises(ProbeInputError, match="NaN"):
        ood_metrics([1.0, np.nan], [0.0])
    with pytest.raises(ProbeInputError, match="non-empty"):
        ood_metrics([], [0.0])


# --------------------------------------------------------------------------- pytorch-ood


def _torch(*arrays):
    import torch

    return [torch.from_numpy(np.asarray(a)) for a in arrays]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_scores_match_pytorch_ood(temperature):
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax

    logits = np.random.default_rng(3).standard_normal((64, 7)) * 4
    (Z,) = _torch(logits)
    ref = {"msp": MaxSoftmax(None, t=temperature), "maxlogit": MaxLogit(None),
           "energy": EnergyBased(None, t=temperature)}
    for kind, det in ref.items():
        got = ood.logit_scores(logits, kind, temperature=temperature, batch_size=10)
        np.testing.assert_allclose(got, -det.predict_logits(Z).numpy(), rtol=1e-12, atol=1e-12, err_msg=kind)


def test_probe_logit_scorers_match_pytorch_ood(data):
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax

    probe, Q = data["probe"], data["Q"]
    np.testing.assert_allclose(Q @ ood.linear_head(probe)[0].T + ood.linear_head(probe)[1],
                               probe.decision_function(Q), atol=1e-4)
    (Z,) = _torch(Q.astype(np.float64) @ ood.linear_head(probe)[0].T + ood.linear_head(probe)[1])
    for kind, det in {"msp": MaxSoftmax(None), "maxlogit": MaxLogit(None), "energy": EnergyBased(None)}.items():
        got = ood.LogitScorer(kind, probe=probe).fit(data["X"]).score_samples(Q)
        np.testing.assert_allclose(got, -det.predict_logits(Z).numpy(), rtol=1e-10, err_msg=kind)


def test_mahalanobis_matches_pytorch_ood(data):
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import RMD, Mahalanobis

    X, y, Q = data["X"], data["y"], data["Q"]
    Xt, yt, Qt = _torch(X, y, Q)
    n = len(X)
    # pytorch-ood: outlier score 0.5 * min_k d_k with the scatter not divided by n (plus a 1e-6 ridge)
    got = ood.Mahalanobis().fit(X, y).score_samples(Q)
    ref = Mahalanobis(None).fit_features(Xt, yt).predict_features(Qt).double().numpy()
    np.testing.assert_allclose(got, -2 * n * ref, rtol=1e-4)
    # RMD: min_k (d_k - d_0), both scatters undivided
    got = ood.RelativeMahalanobis().fit(X, y).score_samples(Q)
    ref = RMD(None).fit_features(Xt, yt).predict_features(Qt).double().numpy()
    np.testing.assert_allclose(got, -n * ref, atol=1e-4 * np.abs(got).max())


def test_knn_matches_pytorch_ood(data):
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import KNN

    X, y, Q = data["X"], data["y"], data["Q"]
    Xt, yt, Qt = _torch(X, y, Q)
    for k in (1, 10, 50):
        got = ood.KNNDistance(k=k, batch_size=33).fit(X).score_samples(Q)
        ref = KNN(None, k=k).fit_features(Xt, yt).predict_features(Qt).numpy()
        np.testing.assert_allclose(got, -ref, atol=1e-5, err_msg=f"k={k}")


def test_vim_matches_pytorch_ood(data):
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import ViM

    X, y, Q = data["X"], data["y"], data["Q"]
    W, b = ood.linear_head(data["probe"])
    for dim in (4, 8):
        ours = ood.ViM(dim, probe=data["probe"]).fit(X)
        ref = ViM(None, d=dim, w=_torch(W)[0], b=_torch(b)[0]).fit_features(*_torch(X, y))
        assert ours.alpha_ == pytest.approx(ref.alpha, rel=1e-4)
        got = ours.score_samples(Q)
        np.testing.assert_allclose(got, -ref.predict_features(_torch(Q)[0]).double().numpy(),
                                   atol=1e-5 * np.abs(got).max(), err_msg=f"dim={dim}")
        # the same head given as W, b
        np.testing.assert_allclose(ood.ViM(dim, W=W, b=b).fit(X).score_samples(Q), got, rtol=1e-12)


# --------------------------------------------------------------------------- numpy transcriptions


def test_cosine_matches_numpy_formula(data):
    X, y, Q = data["X"].astype(np.float64), data["y"], data["Q"].astype(np.float64)
    means = np.stack([X[y == c].mean(0) for c in range(N_CLASSES)])
    unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(ood.CosineNearestMean().fit(X, y).score_samples(Q),
                               (unit(Q) @ unit(means).T).max(1), rtol=1e-12)


@pytest.mark.parametrize("singular", [False, True])
def test_mahalanobis_matches_numpy_pinv(data, singular):
    """As Lee et al.'s code: EmpiricalCovariance of class-centred features, pinv; a repeated
    feature makes the covariance singular (the eigendecomposition path)."""
    X, y, Q = data["X"].astype(np.float64), data["y"], data["Q"].astype(np.float64)
    if singular:
        X, Q = np.c_[X, X[:, :1]], np.c_[Q, Q[:, :1]]
    means = np.stack([X[y == c].mean(0) for c in range(N_CLASSES)])
    centred = X - means[y]
    prec = np.linalg.pinv(centred.T @ centred / len(X), hermitian=True, rcond=1e-10)
    dists = np.stack([np.einsum("ij,jk,ik->i", Q - m, prec, Q - m) for m in means], 1)
    np.testing.assert_allclose(ood.Mahalanobis().fit(X, y).score_samples(Q), -dists.min(1), rtol=1e-9)
    Xc = X - X.mean(0)  # relative: minus the background Gaussian's distance, fitted to all of train
    prec0 = np.linalg.pinv(Xc.T @ Xc / len(X), hermitian=True, rcond=1e-10)
    d0 = np.einsum("ij,jk,ik->i", Q - X.mean(0), prec0, Q - X.mean(0))
    np.testing.assert_allclose(ood.RelativeMahalanobis().fit(X, y).score_samples(Q), -(dists - d0[:, None]).min(1),
                               rtol=1e-8)


def test_logit_scorer_fits_its_own_probe(data):
    X, y, Q = data["X"], data["y"], data["Q"]
    scorer = ood.LogitScorer("energy", Cs=[0.1, 1.0]).fit(X, y)
    assert scorer.sweep_.best_C in (0.1, 1.0)
    W, b = ood.linear_head(scorer.probe_)
    np.testing.assert_allclose(scorer.score_samples(Q), ood.logit_scores(Q.astype(np.float64) @ W.T + b, "energy"))
    with pytest.raises(ProbeInputError, match="y is needed"):
        ood.ViM(4).fit(X)


def test_binary_sklearn_head_gets_two_logits():
    from sklearn.linear_model import LogisticRegression

    X, y = clusters(200, seed=4)
    lr = LogisticRegression().fit(X, y % 2)
    W, b = ood.linear_head(lr)
    assert W.shape == (2, D)
    np.testing.assert_allclose((X @ W.T + b) @ [-1, 1], lr.decision_function(X), rtol=1e-6)
    np.testing.assert_allclose(ood.LogitScorer("msp", probe=lr).fit(X).score_samples(X), lr.predict_proba(X).max(1))


# --------------------------------------------------------------------------- contract


def test_every_score_separates_far_ood_and_follows_the_contract(data):
    X, y, Q = data["X"], data["y"], data["Q"]
    assert set(ood.SCORES) == {"msp", "maxlogit", "energy", "mahalanobis", "relative_mahalanobis", "knn", "vim",
                               "cosine"}
    for name, scorer in all_scorers(data["probe"]).items():
        assert not [k for k in vars(scorer) if k.endswith("_")], name  # __init__ stores params only
        clone(scorer)
        assert scorer.fit(X, y) is scorer
        s = scorer.score_samples(Q)
        assert s.shape == (len(Q),) and s.dtype == np.float64, name
        # a flipped sign would give < 0.25; logit scores are weak on far OOD (maxlogit 0.78)
        assert ood_metrics(s[: data["n_id"]], s[data["n_id"] :])["auroc"] > 0.75, name


def test_chunked_equals_unchunked_and_streams_rows(data):
    X, y, Q = data["X"], data["y"], data["Q"]
    whole_scorers = all_scorers(data["probe"], batch_size=100_000)
    for name, scorer in all_scorers(data["probe"], batch_size=7).items():
        whole = whole_scorers[name].fit(X, y).score_samples(Q)
        rows, queries = RowsOnly(X), RowsOnly(Q)
        chunked = scorer.fit(rows, y).score_samples(queries)
        assert queries.reads == -(-len(Q) // 7), name
        assert rows.reads >= len(X) // 7 or name in ood.LOGIT_KINDS, name  # given a head, nothing to read
        # knn: faiss float32 distances; vim: its fit runs float32 products, so chunking moves the last bits
        rtol, atol = {"knn": (1e-9, 1e-5), "vim": (1e-4, 1e-4)}.get(name, (1e-9, 1e-9))
        np.testing.assert_allclose(chunked, whole, rtol=rtol, atol=atol, err_msg=name)
    logits = Q @ ood.linear_head(data["probe"])[0].T
    np.testing.assert_allclose(ood.logit_scores(logits, "msp", batch_size=3), ood.logit_scores(logits, "msp"))


def test_bad_inputs_raise_probe_input_error(data):
    X, y, Q = data["X"], data["y"], data["Q"]
    bad = Q.copy()
    bad[3, 2] = np.nan
    for name, scorer in all_scorers(data["probe"]).items():
        if name not in ood.LOGIT_KINDS:  # a logit scorer given its head reads no train rows
            with pytest.raises(ProbeInputError, match="NaN"):
                scorer.fit(bad, np.resize(y, len(bad)))
        scorer.fit(X, y)
        with pytest.raises(ProbeInputError, match="NaN"):
            scorer.score_samples(bad)
        with pytest.raises(ProbeInputError, match="features"):
            scorer.score_samples(Q[:, :-1])
    with pytest.raises(ProbeInputError, match="one label per row"):
        ood.Mahalanobis().fit(X, y[:-1])
    with pytest.raises(ProbeInputError, match="k must be"):
        ood.KNNDistance(k=len(X) + 1).fit(X)
    with pytest.raises(ProbeInputError, match="kind"):
        ood.logit_scores(Q, "entropy")
    with pytest.raises(ProbeInputError, match="logits contains NaN"):
        ood.logit_scores(bad, "energy")
    with pytest.raises(ProbeInputError, match="dim"):
        ood.ViM(D, probe=data["probe"]).fit(X)
    with pytest.raises(ProbeInputError, match="unknown OOD score"):
        ood.make_scorer("odin")
    with pytest.raises(ProbeInputError, match="zero variance"):
        ood.Mahalanobis().fit(np.ones((10, 3)), np.arange(10) % 2)


def test_vim_default_dim_follows_the_paper():
    assert [ood.default_vim_dim(d) for d in (2048, 1536, 1280, 768, 512)] == [1000, 1000, 512, 512, 256]
