"""Linear probe on arrays: multinomial L2 logistic regression, full-batch L-BFGS in torch.

:class:`LinearProbe` minimizes scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")``
objective on standardized features (``coef_`` lives in the standardized space), in float32
on ``device``. :func:`sweep_C` fits a whole grid of ``C`` in batches that read ``X`` once per
step, warm-started along the path from strong to weak regularization, and
:func:`select_and_fit` is the protocol: choose ``C`` on a val split (else a seeded stratified
holdout of train), then refit on everything the user gave for training. No evaluation data
ever enters here. The optimizer itself lives in :mod:`backbench.probe._solver`.
"""

from __future__ import annotations

import functools
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from backbench.errors import ProbeInputError
from backbench.probe.grid import default_Cs

_BATCH_COLUMNS = 64  # logits columns per sweep batch (n_C * n_classes) sharing one read of X
_EVAL_ROWS = 32768
_SERIAL_ELEMENTS = 1 << 21  # train features up to this many values are fitted on one CPU thread


@contextmanager
def _one_thread_if_small(X, device: str) -> Iterator[None]:
    """One torch thread while fitting a small in-memory ``X`` on the CPU, the previous count after.

    Each L-BFGS step on such data is a few small tensor operations, where splitting work
    across threads costs more than it saves: digits (1,257 x 96, 13 values of C) fits about
    six times faster on one thread of a busy 2-core machine. Larger or streamed data keeps
    torch's threads.
    """
    import torch

    shape = getattr(X, "shape", ())
    small = (str(device) == "cpu" and isinstance(X, (np.ndarray, torch.Tensor)) and len(shape) == 2
             and shape[0] * shape[1] <= _SERIAL_ELEMENTS)
    threads = torch.get_num_threads()
    if not small or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _serial_when_small(fit):
    """``fit(X_train, ...)`` under :func:`_one_thread_if_small` (its ``device`` keyword, default cpu)."""
    @functools.wraps(fit)
    def wrapper(X_train, *args, **kwargs):
        with _one_thread_if_small(X_train, kwargs.get("device", "cpu")):
            return fit(X_train, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- inputs


def _as_tensor(X, device: str, what: str = "X"):
    """``X`` as a 2-D float32 tensor on ``device``; float32 CPU arrays are not copied; a lazy
    :class:`~backbench.probe.stream.GroupRows` (a cache bigger than memory) stays lazy."""
    import torch

    from backbench.probe.stream import GroupRows

    if isinstance(X, GroupRows):
        return X.on(device)
    if not isinstance(X, torch.Tensor):
        X = _numeric(X, what)
        with warnings.catch_warnings():  # read-only arrays (memory maps): X is never written
            warnings.simplefilter("ignore", UserWarning)
            X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    if X.ndim != 2:
        hint = "; Reshape your data: X.reshape(1, -1) for one sample, X.reshape(-1, 1) for one feature"
        raise ProbeInputError(f"{what} must be 2-D (samples, features), got shape {tuple(X.shape)}"
                              + (hint if X.ndim == 1 else ""))
    if X.shape[1] == 0:
        raise ProbeInputError(f"{what} has 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is required: "
                              f"a probe needs features")
    return X.detach().to(device=device, dtype=torch.float32)


def _numeric(X, what: str) -> np.ndarray:
    """``X`` as a real-valued numpy array. What scikit-learn's ``check_array`` refuses (sparse,
    complex, non-numeric objects) is refused in its words; object arrays of numbers convert."""
    from scipy.sparse import issparse

    if issparse(X):
        raise ProbeInputError(f"{what} is a sparse matrix: sparse input is not supported; pass X.toarray()")
    X = np.asarray(X)
    if X.dtype.kind == "O":
        try:
            X = X.astype(np.float64)
        except TypeError as exc:  # e.g. a dict in a cell: numpy's message names what it met
            raise TypeError(f"{what} must be numeric: {exc}") from None
        except ValueError:
            raise ProbeInputError(f"{what} must be numeric, got dtype object") from None
    if X.dtype.kind == "c":
        raise ProbeInputError(f"{what} must be numeric, got dtype {X.dtype}: Complex data not supported")
    if X.dtype.kind not in "fiub":
        raise ProbeInputError(f"{what} must be numeric, got dtype {X.dtype}")
    return X


def _encode(y, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, codes)`` for labels ``y``; checks its length and that it has 2+ classes.

    A column vector is taken with scikit-learn's ``DataConversionWarning``; continuous
    targets are refused (``Unknown label type``), as scikit-learn's classifiers do.
    """
    from sklearn.exceptions import DataConversionWarning
    from sklearn.utils.multiclass import type_of_target

    if y is None:
        raise ProbeInputError("LinearProbe requires y to be passed, but the target y is None")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        warnings.warn("A column-vector y was passed when a 1d array was expected; pass y.ravel()",
                      DataConversionWarning, stacklevel=3)
        y = y.ravel()
    if y.ndim != 1:
        raise ProbeInputError(f"y must be 1-D (one label per sample), got shape {y.shape}")
    if len(y) != n_rows:
        raise ProbeInputError(f"X has {n_rows} rows but y has {len(y)} labels; they must match")
    target = type_of_target(y)
    if target not in ("binary", "multiclass"):
        raise ProbeInputError(f"Unknown label type: {target}; y must hold class labels (integers or strings)")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ProbeInputError(f"y has only {len(classes)} class {classes.tolist()}; a probe needs at least 2")
    return classes, codes


def _encode_val(y_val, classes: np.ndarray, n_rows: int) -> np.ndarray:
    """Codes of ``y_val`` in ``classes``; labels never seen in training get -1 (always wrong)."""
    y_val = np.asarray(y_val)
    if y_val.ndim != 1 or len(y_val) != n_rows:
        raise ProbeInputError(f"X_val has {n_rows} rows but y_val has shape {y_val.shape}; they must match")
    pos = np.clip(np.searchsorted(classes, y_val), 0, len(classes) - 1)
    return np.where(classes[pos] == y_val, pos, -1)


def _slabs(X, device=None):
    """``(start, float32 tensor)`` blocks of ``_EVAL_ROWS`` rows (tensor) or chunks (streamed)."""
    from backbench.probe._solver import _blocks

    return _blocks(X, device or getattr(X, "device", "cpu"), _EVAL_ROWS)


def _check_finite(X, what: str) -> None:
    from backbench.probe.blocks import NOT_FINITE, iter_blocks
    from backbench.probe.stream import GroupRows

    if isinstance(X, GroupRows):
        return  # checked chunk by chunk as it is read
    for _ in iter_blocks(X, _EVAL_ROWS, check_finite=NOT_FINITE.format(name=what, purpose="probing")):
        pass


# ----------------------------------------------------------------------------- estimator


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial L2 logistic regression on standardized features, fitted by L-BFGS in torch.

    Minimizes the objective of ``LogisticRegression(C=C, solver="lbfgs")`` on
    ``StandardScaler``-ed features (two classes: the same binary problem, held as two rows).
    ``tol`` bounds the max-abs gradient of the ``1/n``-scaled objective, as scikit-learn's.
    Fitted: ``coef_`` (n_classes, d) in the standardized space, ``intercept_`` (n_classes,),
    ``classes_``, ``mean_`` and ``scale_`` (train statistics), ``n_iter_``.
    """

    def __init__(self, C: float = 1.0, *, max_iter: int = 1000, tol: float = 1e-6, device: str = "cpu",
                 standardize: bool = True) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.standardize = standardize

    def fit(self, X, y) -> LinearProbe:
        """Fit on all rows of ``X``; returns ``self``."""
        Xt = _as_tensor(X, self.device)
        classes, codes = _encode(y, len(Xt))
        return self._fit_tensor(Xt, codes, classes)

    def _fit_tensor(self, Xt, codes, classes, warm=None, eig=None) -> LinearProbe:
        """Fit on a prepared tensor; a sweep passes ``warm``, ``(state, row, lam)`` of its solution
        for this ``C`` (a start with its curvature pairs), and its preconditioner."""
        import torch

        from backbench.probe import _solver

        if not self.C > 0:
            raise ProbeInputError(f"C must be positive, got {self.C}")
        n, d = Xt.shape
        K = len(classes)
        codes_t = torch.as_tensor(codes, dtype=torch.long, device=Xt.device)
        weights = torch.full((n,), 1.0 / n, device=Xt.device)
        mean, scale = _solver.moments(Xt, weights, self.standardize)
        obj = _solver.Objective(Xt, codes_t, weights, mean, scale, K)
        if eig is None:
            eig = _solver.preconditioner(Xt, weights, mean, scale)
        if warm is None:
            start = _solver.State.fresh(_solver.initial(codes_t, weights, K, d))
        else:
            state, row, lam = warm
            start = state.restart(row, lam, _solver.strengths([self.C], n, K, Xt.device), K * d, False)
        state, n_iter = _solver.solve(obj, [self.C], n, start, max_iter=self.max_iter, tol=self.tol, eig=eig)
        self._set_fitted(state.theta[0].double().cpu().numpy(), classes, mean.cpu().numpy(), scale.cpu().numpy())
        self.n_iter_ = int(n_iter[0])
        return self

    def _set_fitted(self, theta: np.ndarray, classes, mean, scale) -> None:
        K, d = len(classes), len(mean)
        self.classes_ = classes
        self.coef_ = theta[: K * d].reshape(K, d)
        self.intercept_ = theta[K * d :] - theta[K * d :].mean()
        self.mean_, self.scale_ = mean, scale
        self.n_features_in_ = d

    def _logits(self, X) -> np.ndarray:
        import torch

        check_is_fitted(self, "coef_")
        Xt = _as_tensor(X, self.device)
        if Xt.shape[1] != self.n_features_in_:
            raise ProbeInputError(f"X has {Xt.shape[1]} features, but {type(self).__name__} is expecting "
                                  f"{self.n_features_in_} features as input (the number it was fitted on)")
        W_eff = self.coef_ / self.scale_
        b_eff = torch.as_tensor(self.intercept_ - W_eff @ self.mean_, dtype=torch.float32, device=Xt.device)
        W_eff = torch.as_tensor(W_eff, dtype=torch.float32, device=Xt.device)
        Z = np.concatenate([torch.addmm(b_eff, Xb, W_eff.t()).double().cpu().numpy() for _, Xb in _slabs(Xt)]
                           or [np.zeros((0, len(self.classes_)))])
        if not np.isfinite(Z).all():
            raise ProbeInputError("X contains NaN or infinite values; drop or impute them before probing")
        return Z

    def decision_function(self, X) -> np.ndarray:
        """Logits (n, n_classes); for two classes the logit difference (n,), as scikit-learn."""
        Z = self._logits(X)
        return Z[:, 1] - Z[:, 0] if Z.shape[1] == 2 else Z

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes) in the order of ``classes_``; rows sum to 1."""
        Z = self._logits(X)
        Z -= Z.max(1, keepdims=True)
        np.exp(Z, out=Z)
        return Z / Z.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row."""
        best = self._logits(X).argmax(1)  # first: an unfitted probe raises NotFittedError
        return self.classes_[best]


# ----------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class SweepResult:
    """Validation accuracy per ``C`` (ascending); ``best_C`` maximizes it, ties to the smaller ``C``.

    ``selection`` says what chose ``C``: ``"val"``, ``"holdout"`` (a stratified share of
    train) or ``"none"`` (one-shot data without val: the grid's median ``C``, no sweep).
    """

    Cs: list[float]
    val_accuracy: list[float]
    n_iter: list[int]
    best_C: float
    best_index: int
    seconds: float
    selection: str = "val"

    def to_dict(self) -> dict:
        return asdict(self)


def _val_accuracy(obj, theta, X_val, codes_val) -> list[float]:
    """Accuracy of each row of ``theta`` on the val rows: one matmul for the whole batch."""
    import torch

    _, W_eff, b_eff = obj.effective(theta)
    hits = torch.zeros(len(theta), dtype=torch.float64, device=theta.device)
    for i, Xb in _slabs(X_val, theta.device):
        Z = torch.addmm(b_eff, Xb, W_eff.t()).view(-1, len(theta), obj.K)
        hits += (Z.argmax(2) == codes_val[i : i + len(Xb), None]).sum(0).double()
    return (hits / max(len(X_val), 1)).tolist()


def _sorted_Cs(Cs) -> list[float]:
    Cs = sorted(float(C) for C in np.ravel(default_Cs() if Cs is None else Cs))
    if not Cs or not Cs[0] > 0 or not np.isfinite(Cs[-1]):
        raise ProbeInputError(f"Cs must be a non-empty list of positive values, got {Cs}")
    return Cs


def _path(Xt, codes, weights, X_val, codes_val, Cs, n_classes: int, *, standardize: bool, max_iter: int,
          tol: float, selection: str = "val"):
    """Fit every ``C`` (ascending) on the rows of ``Xt`` with weight > 0 and score it on ``X_val``.

    Each batch starts where the last ended, with its L-BFGS pairs, and steps first along the
    path (linear in ``log C``). Returns ``(SweepResult, warm, eig)``: ``warm`` is the best ``C``'s
    ``(state, row, lam)`` and ``eig`` the preconditioner, both to start the final fit.
    """
    from backbench.probe import _solver

    t0 = time.perf_counter()
    Cs = _sorted_Cs(Cs)
    mean, scale = _solver.moments(Xt, weights, standardize)
    obj = _solver.Objective(Xt, codes, weights, mean, scale, n_classes)
    eig = _solver.preconditioner(Xt, weights, mean, scale)
    n_fit, Kd = int((weights > 0).sum()), n_classes * Xt.shape[1]
    batch = max(1, _BATCH_COLUMNS // n_classes)
    thetas, accuracy, n_iter = [], [], []
    state = lam = warm = None
    for i in range(0, len(Cs), batch):  # strong to weak regularization, each batch warm-started
        chunk = Cs[i : i + batch]
        lam_next = _solver.strengths(chunk, n_fit, n_classes, Xt.device)
        if state is None:
            theta0 = _solver.initial(codes, weights, n_classes, Xt.shape[1])
            begin, first = _solver.State.fresh(theta0.expand(len(chunk), -1).clone()), None
        else:  # the last solution with its f, gradient and pairs, and a first step along the path
            begin = state.restart(len(state.theta) - 1, float(lam[-1]), lam_next, Kd, True, pairs=False)
            first = _solver.extrapolate(thetas, Cs[:i], chunk) - begin.theta
        state, iters = _solver.solve(obj, chunk, n_fit, begin, max_iter=max_iter, tol=tol, eig=eig, first=first)
        lam = lam_next
        accuracy += _val_accuracy(obj, state.theta, X_val, codes_val)
        j = int(np.argmax(accuracy))
        if j >= i:  # a new best: keep its state (pairs included) to start the final fit
            warm = (state.restart(j - i, float(lam[j - i]), lam[j - i : j - i + 1], Kd, True), 0, float(lam[j - i]))
        thetas = (thetas + list(state.theta))[-2:]
        n_iter += iters.tolist()
    best = int(np.argmax(accuracy))
    result = SweepResult(Cs, accuracy, n_iter, Cs[best], best, time.perf_counter() - t0, selection)
    return result, warm, eig


@_serial_when_small
def sweep_C(X_train, y_train, X_val, y_val, Cs=None, *, device: str = "cpu", standardize: bool = True,
            max_iter: int = 1000, tol: float = 1e-5) -> SweepResult:
    """Fit a probe for every ``C`` (default :func:`default_Cs`) on train and score each on val.

    ``tol`` (max-abs gradient) defaults to 10x tighter than scikit-learn's 1e-4.
    """
    import torch

    Xt = _as_tensor(X_train, device)
    classes, codes = _encode(y_train, len(Xt))
    Xv = _as_tensor(X_val, device, "X_val")
    _check_finite(Xv, "X_val")
    codes_val = torch.as_tensor(_encode_val(y_val, classes, len(Xv)), device=device)
    weights = torch.full((len(Xt),), 1.0 / len(Xt), device=device)
    return _path(Xt, torch.as_tensor(codes, device=device), weights, Xv, codes_val, Cs, len(classes),
                 standardize=standardize, max_iter=max_iter, tol=tol)[0]


def _holdout(codes: np.ndarray, fraction: float, seed: int, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (fit, holdout) row indices of a seeded stratified split of train.

    The holdout holds at least one row per class (few-shot data: ``fraction`` of 5 shots x
    10 classes would be too few to stratify); every class needs 2 rows.
    """
    from sklearn.model_selection import train_test_split

    size = max(int(np.ceil(fraction * len(codes))), len(classes))
    try:
        fit, held = train_test_split(np.arange(len(codes)), test_size=min(size, len(codes) - len(classes)),
                                     stratify=codes, random_state=seed)
    except ValueError as exc:
        raise ProbeInputError(f"cannot hold out a stratified {fraction:.0%} of train to select C ({exc}); "
                              f"pass X_val/y_val or more samples per class") from None
    return np.sort(fit), np.sort(held)


def _selection_rows(Xt, y_train, X_val, y_val, holdout: float, seed: int):
    """``(classes, codes, weights, X_eval, codes_eval)`` for the sweep; ``codes`` cover train (+ val).

    Without val, ``weights`` are 0 on a stratified holdout of train (its rows copied into
    ``X_eval``) and equal elsewhere; ``None`` when a class has one sample (no holdout possible).
    """
    import torch

    from backbench.probe.stream import GroupRows

    device = Xt.device
    if X_val is None:
        classes, codes = _encode(y_train, len(Xt))
        if np.bincount(codes).min() < 2:
            return None
        fit, held = _holdout(codes, holdout, seed, classes)
        weights = torch.zeros(len(Xt), device=device)
        weights[torch.as_tensor(fit, device=device)] = 1.0 / len(fit)
        X_held = Xt.subset(held) if isinstance(Xt, GroupRows) else Xt[torch.as_tensor(held, device=device)]
        return classes, codes, weights, X_held, codes[held]
    X_eval = _as_tensor(X_val, device, "X_val")
    _encode_val(y_val, _encode(y_train, len(Xt))[0], len(X_eval))  # checks both lengths
    classes, codes = _encode(np.concatenate([np.asarray(y_train), np.asarray(y_val)]), len(Xt) + len(X_eval))
    weights = torch.full((len(Xt),), 1.0 / len(Xt), device=device)
    return classes, codes, weights, X_eval, codes[len(Xt) :]


@_serial_when_small
def select_and_fit(X_train, y_train, Cs=None, *, X_val=None, y_val=None, seed: int = 0, device: str = "cpu",
                   holdout: float = 0.1, standardize: bool = True, max_iter: int = 1000,
                   tol: float = 1e-5) -> tuple[LinearProbe, SweepResult]:
    """Choose ``C`` on val (else a seeded stratified ``holdout`` of train); refit on train (+ val).

    Returns the final :class:`LinearProbe` (warm-started from the sweep) and the sweep; ``tol``
    serves both (10x tighter than scikit-learn's default). One-shot data without val leaves
    nothing to hold out: the grid's median ``C`` is used (``selection="none"``).
    """
    import torch

    from backbench.probe.stream import GroupRows

    Xt = _as_tensor(X_train, device)
    Cs = _sorted_Cs(Cs)
    probe = LinearProbe(1.0, max_iter=max_iter, tol=tol, device=device, standardize=standardize)
    rows = _selection_rows(Xt, y_train, X_val, y_val, holdout, seed)
    if rows is None:
        classes, codes = _encode(y_train, len(Xt))
        probe.set_params(C=Cs[len(Cs) // 2])._fit_tensor(Xt, codes, classes)
        return probe, SweepResult(Cs, [], [], probe.C, len(Cs) // 2, 0.0, "none")
    classes, codes, weights, X_eval, codes_eval = rows
    _check_finite(X_eval, "X_val")
    result, warm, eig = _path(Xt, torch.as_tensor(codes[: len(Xt)], device=device), weights, X_eval,
                                torch.as_tensor(codes_eval, device=device), Cs, len(classes), standardize=standardize,
                                max_iter=max_iter, tol=tol, selection="holdout" if X_val is None else "val")
    X_all = Xt if X_val is None else Xt.concat(X_eval) if isinstance(Xt, GroupRows) else torch.cat([Xt, X_eval])
    probe.set_params(C=result.best_C)._fit_tensor(X_all, codes, classes, warm=warm, eig=eig)
    return probe, result
