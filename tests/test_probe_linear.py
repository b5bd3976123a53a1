"""The pure-array probe layer: linear probe vs scikit-learn, the C sweep, few-shot draws, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from backbench.errors import ProbeInputError
from backbench.probe.fewshot import few_shot_indices
from backbench.probe.linear import LinearProbe, SweepResult, default_Cs, select_and_fit, sweep_C
from backbench.probe.metrics import classification_metrics, expected_calibration_error


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def blobs(n: int = 600, d: int = 20, k: int = 4, sep: float = 1.0, seed: int = 0):
    """Gaussian classes with correlated, offset features: neither separable nor chance."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (k, d))
    mix = rng.normal(0, 1, (d, d)) / np.sqrt(d)
    y = rng.integers(0, k, n)
    X = (rng.normal(0, 1, (n, d)) @ mix + means[y]) * rng.uniform(0.5, 3, d) + rng.uniform(-2, 5, d)
    return X.astype(np.float32), y


def sklearn_reference(X, y, C: float):
    """A tightly converged scikit-learn fit (one thread: tiny problems, a busy machine)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(X.astype(np.float64))
    with threadpool_limits(limits=1):
        model = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(scaler.transform(X.astype(np.float64)), y)
    return scaler, model


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_matches_sklearn_on_digits(digits, C):
    X, y = digits
    Xtr, ytr, Xte, yte = X[:1200], y[:1200], X[1200:], y[1200:]
    scaler, ref = sklearn_reference(Xtr, ytr, C)
    probe = LinearProbe(C=C).fit(Xtr, ytr)
    assert probe.fit(Xtr, ytr) is probe
    for Xs, ys in ((Xtr, ytr), (Xte, yte)):
        ours, theirs = probe.score(Xs, ys), ref.score(scaler.transform(Xs), ys)
        assert abs(ours - theirs) <= 0.002, (ours, theirs)
    assert rel(probe.coef_, ref.coef_) < 1e-2
    assert np.allclose(probe.intercept_, ref.intercept_, atol=0.05)
    np.testing.assert_allclose(probe.mean_, scaler.mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probe.scale_, scaler.scale_, rtol=1e-4, atol=1e-6)
    assert probe.coef_.shape == (10, 64) and probe.n_features_in_ == 64


def test_binary_matches_sklearn_binary_problem():
    X, y = blobs(k=2, sep=0.5)
    scaler, ref = sklearn_reference(X, y, 0.1)
    probe = LinearProbe(C=0.1).fit(X, y)
    assert probe.coef_.shape == (2, X.shape[1])
    assert rel(probe.coef_[1] - probe.coef_[0], ref.coef_[0]) < 1e-2
    np.testing.assert_allclose(probe.decision_function(X), ref.decision_function(scaler.transform(X)), atol=2e-3)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(scaler.transform(X)), atol=1e-3)


def test_unstandardized_matches_sklearn_on_raw_features():
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(sep=0.7)
    X = (X - X.mean(0)) / X.std(0)  # well scaled already, so the raw problem is well posed
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        ref = LogisticRegression(C=0.5, tol=1e-8, max_iter=5000).fit(X.astype(np.float64), y)
    probe = LinearProbe(C=0.5, standardize=False).fit(X, y)
    assert np.all(probe.mean_ == 0) and np.all(probe.scale_ == 1)
    assert rel(probe.coef_, ref.coef_) < 1e-2


def test_preconditioning_changes_the_path_not_the_solution(monkeypatch):
    from backbench.probe import _solver

    X, y = blobs(sep=0.7)
    with_eig = LinearProbe(C=1.0).fit(X, y)
    monkeypatch.setattr(_solver, "MAX_PRECONDITION_DIM", 0)
    plain = LinearProbe(C=1.0).fit(X, y)
    assert rel(with_eig.coef_, plain.coef_) < 5e-3


def test_estimator_contract_and_outputs():
    from sklearn.base import clone

    X, y = blobs()
    labels = np.array(["ant", "bee", "cat", "dog"])[y]
    probe = LinearProbe(C=0.3, max_iter=50)
    assert clone(probe).get_params() == probe.get_params()
    assert not hasattr(probe, "coef_")
    probe.fit(X.astype(np.float16), labels)  # float16 input, string labels
    proba = probe.predict_proba(X)
    assert proba.shape == (len(X), 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    assert set(probe.predict(X)) <= set(probe.classes_)
    assert list(probe.classes_) == ["ant", "bee", "cat", "dog"]
    assert probe.decision_function(X).shape == (len(X), 4)
    assert 0.5 < probe.score(X, labels) <= 1.0
    assert 0 < probe.n_iter_ <= 50


# ----------------------------------------------------------------------------- input checks


def test_nan_features_raise_a_clear_error():
    X, y = blobs(n=100)
    X[3, 2] = np.nan
    with pytest.raises(ProbeInputError, match="NaN or infinite"):
        LinearProbe().fit(X, y)
    X[3, 2] = np.inf
    with pytest.raises(ProbeInputError, match="NaN or infinite"):
        LinearProbe().fit(X, y)
    good = LinearProbe(max_iter=5).fit(*blobs(n=100))
    with pytest.raises(ProbeInputError, match="NaN or infinite"):
        good.predict(X)


def test_bad_labels_raise_clear_errors():
    X, y = blobs(n=100)
    with pytest.raises(ProbeInputError, match="at least 2"):
        LinearProbe().fit(X, np.zeros(100, dtype=int))
    with pytest.raises(ProbeInputError, match="100 rows but y has 99 labels"):
        LinearProbe().fit(X, y[:99])
    with pytest.raises(ProbeInputError, match="2-D"):
        LinearProbe().fit(X[0], y[:1])
    with pytest.raises(ProbeInputError, match="positive"):
        select_and_fit(X, y, [0.0, 1.0])


# ----------------------------------------------------------------------------- sweep and protocol


def test_sweep_picks_the_C_with_the_best_val_accuracy():
    X, y = blobs(n=900, sep=0.6)
    Xtr, ytr, Xva, yva = X[:600], y[:600], X[600:], y[600:]
    Cs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    result = sweep_C(Xtr, ytr, Xva, yva, Cs[::-1])
    assert isinstance(result, SweepResult) and result.Cs == Cs
    assert result.best_index == int(np.argmax(result.val_accuracy)) and result.best_C == Cs[result.best_index]
    for C, acc in zip(Cs, result.val_accuracy):  # each the accuracy of an independent fit, to a sample or two
        assert abs(acc - LinearProbe(C=C).fit(Xtr, ytr).score(Xva, yva)) <= 2 / len(yva)
    assert result.val_accuracy[0] < max(result.val_accuracy)
    assert set(result.to_dict()) >= {"Cs", "val_accuracy", "best_C"}


def test_sweep_breaks_ties_towards_stronger_regularization():
    X, y = blobs(n=400, sep=3.0)  # separable: every C scores 100% on val
    result = sweep_C(X[:300], y[:300], X[300:], y[300:], [0.1, 1.0, 10.0])
    assert result.val_accuracy == [1.0, 1.0, 1.0] and result.best_C == 0.1


def test_select_and_fit_uses_a_stratified_train_holdout(monkeypatch):
    from backbench.probe import linear

    seen = {}
    real_path = linear._path

    def spy(Xt, codes, weights, X_val, codes_val, *args, **kwargs):
        seen.update(weights=weights.numpy().copy(), X_val=X_val.numpy().copy(), codes_val=codes_val.numpy().copy())
        return real_path(Xt, codes, weights, X_val, codes_val, *args, **kwargs)

    monkeypatch.setattr(linear, "_path", spy)
    X, y = blobs(n=500, sep=0.6)
    probe, result = select_and_fit(X, y, [0.01, 1.0], seed=3)
    held = np.flatnonzero(seen["weights"] == 0)
    assert len(held) == 50  # 10% of train, the rest fitted with equal weights
    np.testing.assert_allclose(seen["weights"][seen["weights"] > 0], 1 / 450)
    np.testing.assert_array_equal(seen["X_val"], X[held])  # selection only ever sees train rows
    np.testing.assert_array_equal(np.bincount(seen["codes_val"]), np.bincount(y[held]))
    assert abs(np.bincount(y[held]) / 50 - np.bincount(y) / 500).max() <= 0.03  # stratified
    assert probe.C == result.best_C and result.selection == "holdout"
    again = select_and_fit(X, y, [0.01, 1.0], seed=3)[0]
    np.testing.assert_allclose(again.coef_, probe.coef_, atol=1e-6)  # the seed fixes the split


def test_select_and_fit_with_val_refits_on_train_plus_val():
    X, y = blobs(n=700, sep=0.6)
    probe, result = select_and_fit(X[:500], y[:500], [0.01, 1.0], X_val=X[500:], y_val=y[500:])
    assert result.best_C in (0.01, 1.0)
    direct = LinearProbe(C=result.best_C).fit(X, y)  # train + val together
    assert rel(probe.coef_, direct.coef_) < 1e-2
    np.testing.assert_allclose(probe.mean_, X.mean(0), rtol=1e-4, atol=1e-4)


def test_few_shot_probe_selects_C_on_its_shots():
    X, y = blobs(n=400, sep=1.0)
    idx = few_shot_indices(y, 5, seed=0)
    probe, result = select_and_fit(X[idx], y[idx], [0.1, 1.0], seed=0)
    assert len(result.val_accuracy) == 2 and probe.classes_.tolist() == [0, 1, 2, 3]


def test_one_shot_without_val_uses_the_median_C():
    X, y = blobs(n=100)
    idx = few_shot_indices(y, 1, seed=0)
    probe, result = select_and_fit(X[idx], y[idx], [0.01, 0.1, 1.0])
    assert result.selection == "none" and result.best_C == probe.C == 0.1 and result.val_accuracy == []


def test_default_grid_is_a_log_grid():
    Cs = default_Cs()
    assert len(Cs) >= 10 and np.allclose(np.diff(np.log10(Cs)), np.log10(Cs[1] / Cs[0]))


def test_objective_matches_a_hand_computed_one_and_a_path_restart_shifts_it_exactly():
    """f and its gradient against numpy (float64); a restart at a new C costs no pass and agrees."""
    import torch
    from scipy.special import logsumexp, softmax

    from backbench.probe import _solver

    X, y = blobs(n=300, d=8, k=3)
    n, d, K = 300, 8, 3
    Xt, codes, w = torch.from_numpy(X), torch.as_tensor(y), torch.full((n,), 1.0 / n)
    mean, scale = _solver.moments(Xt, w, True)
    obj = _solver.Objective(Xt, codes, w, mean, scale, K)
    theta = torch.randn(1, K * d + K, generator=torch.Generator().manual_seed(0)) * 0.3
    lam = _solver.strengths([0.1], n, K, "cpu")
    f, g = obj(theta, lam)
    Xs = (X.astype(np.float64) - X.mean(0)) / X.std(0)
    W, b = theta[0, : K * d].double().numpy().reshape(K, d), theta[0, K * d :].double().numpy()
    Z = Xs @ W.T + b
    f_ref = np.mean(logsumexp(Z, axis=1) - Z[np.arange(n), y]) + 0.5 * float(lam[0]) * (W**2).sum()
    R = (softmax(Z, axis=1) - np.eye(K)[y]) / n
    g_ref = np.concatenate([(R.T @ Xs + float(lam[0]) * W).ravel(), R.sum(0)])
    assert abs(float(f[0]) - f_ref) <= 1e-6 * abs(f_ref)
    np.testing.assert_allclose(g[0].double().numpy(), g_ref, atol=2e-6)
    state = _solver.State.fresh(theta.clone())
    state.f, state.g = f, g
    lam_new = _solver.strengths([1.0, 10.0], n, K, "cpu")
    moved = state.restart(0, float(lam[0]), lam_new, K * d, True)
    f_new, g_new = obj(theta.expand(2, -1).contiguous(), lam_new)
    np.testing.assert_allclose(moved.f.numpy(), f_new.numpy(), rtol=1e-6)
    np.testing.assert_allclose(moved.g.numpy(), g_new.numpy(), atol=1e-6)


def test_sweep_matches_sklearn_at_every_C_of_the_path(digits):
    """Each C of a batched, warm-started path scores on val as a converged scikit-learn fit does.

    ``tol=1e-7``: at the default 1e-5, C=10 (digits are separable) stops two samples short.
    """
    X, y = digits
    Xtr, ytr, Xva, yva = X[:1200], y[:1200], X[1200:], y[1200:]
    Cs = [1e-3, 1e-2, 0.1, 1.0, 10.0]
    result = sweep_C(Xtr, ytr, Xva, yva, Cs, tol=1e-7)
    for C, acc in zip(Cs, result.val_accuracy):
        scaler, ref = sklearn_reference(Xtr, ytr, C)
        assert abs(acc - ref.score(scaler.transform(Xva), yva)) <= 2 / len(yva), C


def test_final_fit_started_from_the_sweep_matches_sklearn():
    """The refit on all train, started from the holdout solution and its curvature pairs."""
    X, y = blobs(n=800, sep=0.6)
    probe, result = select_and_fit(X, y, [0.01, 0.1, 1.0], seed=0)
    scaler, ref = sklearn_reference(X, y, result.best_C)
    assert rel(probe.coef_, ref.coef_) < 1e-2
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(scaler.transform(X)), atol=2e-3)


# ----------------------------------------------------------------------------- few-shot draws


def test_few_shot_draws_exactly_k_per_class_from_the_given_rows():
    y = np.array([0] * 7 + [1] * 4 + [2] * 9)
    idx = few_shot_indices(y, 3, seed=0)
    assert len(idx) == 9 and len(set(idx)) == 9 and idx.min() >= 0 and idx.max() < len(y)
    assert np.bincount(y[idx]).tolist() == [3, 3, 3]
    np.testing.assert_array_equal(idx, few_shot_indices(y, 3, seed=0))
    draws = {tuple(few_shot_indices(y, 3, seed=s)) for s in range(5)}
    assert len(draws) > 1  # seeds differ


def test_few_shot_error_names_the_short_class():
    y = np.array([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(ProbeInputError, match="'dog' has only 1 samples"):
        few_shot_indices(y, 2, seed=0, class_names=["cat", "dog", "eel"])
    with pytest.raises(ProbeInputError, match="class '1'"):
        few_shot_indices(y, 2, seed=0)
    with pytest.raises(ProbeInputError, match="positive integer"):
        few_shot_indices(y, 0, seed=0)


# ----------------------------------------------------------------------------- metrics


def test_metrics_hand_computed_small_case():
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    y = np.array([0, 1, 0, 1])
    m = classification_metrics(y, proba, labels=[0, 1, 2])
    assert m["top1"] == 0.5 and "top5" not in m
    assert m["mean_per_class"] == pytest.approx(0.5)  # class 0: 1/2, class 1: 1/2
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.3, 0.3])))
    # one row per bin: |1-.7| + |1-.8| + |0-.4| + |0-.6| over 4 rows
    assert m["ece"] == pytest.approx((0.3 + 0.2 + 0.4 + 0.6) / 4)
    assert m["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]


def test_ece_pools_rows_in_a_bin():
    # both confidences fall in (0.6, 0.667]: |mean correct - mean confidence| = |0.5 - 0.62|
    assert expected_calibration_error([1, 0], [0.61, 0.63]) == pytest.approx(0.12)
    assert expected_calibration_error([1, 1], [1.0, 1.0]) == 0.0


def test_top5_with_more_than_five_classes():
    labels = np.arange(7)
    proba = np.tile(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05]), (3, 1))
    m = classification_metrics(np.array([0, 4, 6]), proba, labels)
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(2 / 3)


def test_metrics_check_shapes():
    with pytest.raises(ProbeInputError, match="3 labels"):
        classification_metrics([0, 1], np.ones((2, 2)) / 2, labels=[0, 1, 2])
