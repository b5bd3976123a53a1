"""Post-hoc OOD scores on frozen features: scikit-learn-style scorers, higher = more in-distribution.

Every scorer is fitted on ID train features (``fit(X, y)``; kNN and the logit scores given a
head ignore ``y``) and scores rows with ``score_samples(X)``. Features may be any 2-D array
that slices by rows (numpy, zarr, h5py): both ``fit`` and ``score_samples`` read ``X`` in
chunks of ``batch_size`` rows, so memory holds d x d and chunk x d arrays, never n x n.
Class means and covariances are accumulated in float64 (shifted by the first chunk's mean,
so the one-pass scatter does not cancel) and pseudo-inverted as the papers do (Lee et al.
use scikit-learn's ``EmpiricalCovariance``, i.e. ``scipy.linalg.pinvh``): see :func:`whitening`.
That arithmetic lives in :mod:`backbench.probe.ood_stats`; this module holds the scorers.

Scores (names in :data:`SCORES`):

- ``msp``, ``maxlogit``, ``energy``: on logits, either of a linear head (a backbench
  :class:`~backbench.probe.linear.LinearProbe`, fitted here when none is given, or ``W, b``)
  via :class:`LogitScorer`, or on stored logits via :func:`logit_scores`.
- ``mahalanobis`` (Lee et al. 2018), ``relative_mahalanobis`` (Ren et al. 2021),
  ``knn`` (Sun et al. 2022), ``vim`` (Wang et al. 2022), ``cosine`` (nearest class mean).

Scores that need gradients or perturb the input (ODIN, Mahalanobis with input preprocessing,
GradNorm and kin) are out of scope: backbench scores cached features, not images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from backbench.errors import ProbeInputError
from backbench.probe.knn import check_features, import_faiss, l2_normalize, to_device
from backbench.probe.ood_stats import (LOGIT_KINDS, check_kind, class_moments, default_vim_dim,  # noqa: F401
                                       iter_rows, linear_head, logit_kind, logit_scores, row_sq, softmax_parts,
                                       sq_dists, whitening)

# --------------------------------------------------------------------------- base


class _Scorer(BaseEstimator):
    """Shared plumbing: label encoding, chunked scoring, input checks."""

    def _start_fit(self, X: Any, y: Any = None, *, need_y: bool = True) -> tuple[Any, np.ndarray | None]:
        """``(X, codes)``: checked features and the class code of each row (None without ``y``)."""
        X = check_features(X)
        if int(self.batch_size) < 1:
            raise ProbeInputError(f"batch_size must be a positive integer, got {self.batch_size}")
        self.n_features_in_ = X.shape[1]
        if y is None and not need_y:
            return X, None
        y = None if y is None else np.asarray(y)
        if y is None or y.shape != (X.shape[0],):
            raise ProbeInputError(f"y must hold one label per row of X ({X.shape[0]}), got "
                                  f"{None if y is None else y.shape}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        return X, codes

    def _rows(self, X: Any, dtype=np.float64) -> Iterator[np.ndarray]:
        check_is_fitted(self, "n_features_in_")
        X = check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ProbeInputError(f"X has {X.shape[1]} features but the scorer was fitted on {self.n_features_in_}")
        return iter_rows(X, self.batch_size, dtype)

    def score_samples(self, X: Any) -> np.ndarray:
        """One float per row of ``X``: higher means more in-distribution."""
        return np.concatenate([self._score_chunk(chunk) for chunk in self._rows(X, self._dtype)])

    _dtype = np.float64

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class _HeadScorer(_Scorer):
    """A scorer built on a linear head: ``W, b`` if given, else ``probe``, else a probe fitted here.

    Holds the head's parameters for its subclasses, whose own ``__init__`` (the signature
    scikit-learn's ``get_params`` reads) passes them here.
    """

    def __init__(self, *, probe: Any = None, W: Any = None, b: Any = None, Cs: Any = None, seed: int = 0,
                 device: str = "cpu", batch_size: int = 4096) -> None:
        self.probe = probe
        self.W = W
        self.b = b
        self.Cs = Cs
        self.seed = seed
        self.device = device
        self.batch_size = batch_size

    def _fit_head(self, X: Any, y: Any) -> None:
        if self.W is not None:
            W = np.atleast_2d(np.asarray(self.W, dtype=np.float64))
            b = np.zeros(len(W)) if self.b is None else np.asarray(self.b, dtype=np.float64).reshape(-1)
            self.probe_ = None
        else:
            if self.probe is None:
                from backbench.probe.linear import select_and_fit

                if y is None:
                    raise ProbeInputError("y is needed to fit a linear probe; or pass probe= or W=, b=")
                self.probe_, self.sweep_ = select_and_fit(X, y, self.Cs, seed=self.seed, device=self.device)
            else:
                self.probe_ = self.probe
            W, b = linear_head(self.probe_)
        if W.shape[1] != X.shape[1] or b.shape != (W.shape[0],):
            raise ProbeInputError(f"the head's W {W.shape} and b {b.shape} do not fit {X.shape[1]} features")
        self.W_, self.b_ = W, b


# --------------------------------------------------------------------------- scorers


class LogitScorer(_HeadScorer):
    """MSP (Hendrycks & Gimpel 2017), max logit (Hendrycks et al. 2022) or energy (Liu et al. 2020)
    on the logits ``X @ W.T + b`` of a linear head on the features.
    """

    def __init__(self, kind: str = "msp", *, probe: Any = None, W: Any = None, b: Any = None,
                 temperature: float = 1.0, Cs: Any = None, seed: int = 0, device: str = "cpu",
                 batch_size: int = 4096) -> None:
        super().__init__(probe=probe, W=W, b=b, Cs=Cs, seed=seed, device=device, batch_size=batch_size)
        self.kind = kind
        self.temperature = temperature

    def fit(self, X: Any, y: Any = None) -> LogitScorer:
        """Take the head (or fit a probe on ``X, y``); returns ``self``."""
        check_kind(self.kind, self.temperature)
        X, _ = self._start_fit(X, y, need_y=False)
        self._fit_head(X, y)
        return self

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        return logit_kind(chunk @ self.W_.T + self.b_, self.kind, self.temperature)


class Mahalanobis(_Scorer):
    """Lee et al. 2018: minus the squared Mahalanobis distance to the nearest class mean (tied covariance)."""

    def __init__(self, *, batch_size: int = 4096) -> None:
        self.batch_size = batch_size

    def fit(self, X: Any, y: Any) -> Mahalanobis:
        """Class means and the shared covariance, in one float64 pass over ``X``; returns ``self``."""
        X, codes = self._start_fit(X, y)
        if X.shape[0] < 2:
            raise ProbeInputError("a Gaussian needs at least 2 training rows, got 1 sample")
        m = class_moments(X, codes, len(self.classes_), self.batch_size)
        self.means_, self.covariance_ = m["means"], m["within"]
        self.whitening_ = whitening(self.covariance_)
        self._fit_extra(m)
        return self

    def _fit_extra(self, moments: dict) -> None:
        self._origin = moments["mean"]  # rows are whitened around the train mean
        self._proj = self.whitening_
        self._centers = (self.means_ - self._origin) @ self.whitening_

    def _whiten(self, chunk: np.ndarray) -> np.ndarray:
        chunk -= self._origin  # chunks are fresh copies
        return chunk @ self._proj

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        return -sq_dists(self._whiten(chunk), self._centers).min(1)


class RelativeMahalanobis(Mahalanobis):
    """Ren et al. 2021: ``-min_k (MD_k(x) - MD_0(x))``, MD_0 under one Gaussian fitted to all of train."""

    def _fit_extra(self, moments: dict) -> None:
        super()._fit_extra(moments)
        self.background_mean_, self.background_covariance_ = moments["mean"], moments["total"]
        self.background_whitening_ = whitening(self.background_covariance_)
        self._proj = np.hstack([self.whitening_, self.background_whitening_])  # one product per chunk

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        Z = self._whiten(chunk)
        Z, Z0 = Z[:, : self.whitening_.shape[1]], Z[:, self.whitening_.shape[1] :]
        return row_sq(Z0) - sq_dists(Z, self._centers).min(1)


class CosineNearestMean(_Scorer):
    """Cosine similarity to the nearest class mean (means of the raw features)."""

    def __init__(self, *, batch_size: int = 4096) -> None:
        self.batch_size = batch_size

    def fit(self, X: Any, y: Any) -> CosineNearestMean:
        """Class means in float64, one pass over ``X``; returns ``self``."""
        X, codes = self._start_fit(X, y)
        self.means_ = class_moments(X, codes, len(self.classes_), self.batch_size, scatter=False)["means"]
        self._unit_means = self.means_ / np.maximum(np.linalg.norm(self.means_, axis=1, keepdims=True), 1e-12)
        return self

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        norms = np.maximum(np.linalg.norm(chunk, axis=1), 1e-12)
        return (chunk @ self._unit_means.T).max(1) / norms


class KNNDistance(_Scorer):
    """Sun et al. 2022: minus the Euclidean distance to the k-th nearest L2-normalized train feature.

    Exact search in a faiss ``IndexFlatL2`` (on the GPU for ``device="cuda"`` when faiss can).
    """

    _dtype = np.float32

    def __init__(self, k: int = 50, *, device: str = "cpu", batch_size: int = 4096) -> None:
        self.k = k
        self.device = device
        self.batch_size = batch_size

    def fit(self, X: Any, y: Any = None) -> KNNDistance:
        """Index the L2-normalized rows of ``X`` (``y`` is ignored); returns ``self``."""
        X, _ = self._start_fit(X, None, need_y=False)
        if not 1 <= int(self.k) <= X.shape[0]:
            raise ProbeInputError(f"k must be between 1 and the number of train rows ({X.shape[0]}), got {self.k}")
        from backbench.probe.stream import GroupRows

        self.n_samples_fit_ = X.shape[0]
        if isinstance(X, GroupRows):  # bigger than memory: searched chunk by chunk when scoring
            self.index_, self.rows_ = None, X
            return self
        self.index_ = to_device(import_faiss().IndexFlatL2(X.shape[1]), self.device)
        for chunk in iter_rows(X, self.batch_size, np.float32):
            self.index_.add(l2_normalize(chunk))
        return self

    def score_samples(self, X: Any) -> np.ndarray:
        if getattr(self, "index_", True) is not None:
            return super().score_samples(X)
        from backbench.probe.knn import STREAM_QUERIES
        from backbench.probe.stream import streamed_search

        out = []
        for chunk in iter_rows(check_features(X), STREAM_QUERIES, np.float32):
            sims, _ = streamed_search(self.rows_, l2_normalize(chunk), int(self.k), device=self.device)
            out.append(-np.sqrt(np.maximum(2.0 - 2.0 * sims[:, -1].astype(np.float64), 0.0)))
        return np.concatenate(out)

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        sq, _ = self.index_.search(l2_normalize(chunk), int(self.k))
        return -np.sqrt(np.maximum(sq[:, -1].astype(np.float64), 0.0))


class ViM(_HeadScorer):
    """Wang et al. 2022: energy of the logits minus the virtual logit ``alpha * ||residual||``.

    The residual is the part of ``x - u`` (``u = -pinv(W) b``, singular values of ``W`` below
    ``max(W.shape) * eps_float32`` of the largest treated as zero, as ``torch.linalg.pinv`` does
    on a float32 head: a softmax probe's ``W`` has rank C-1) outside the top-``dim``
    principal subspace of the train features around ``u``; ``alpha`` matches the mean
    virtual logit to the mean max logit on train. ``dim=None``: :func:`default_vim_dim`.
    """

    def __init__(self, dim: int | None = None, *, probe: Any = None, W: Any = None, b: Any = None,
                 Cs: Any = None, seed: int = 0, device: str = "cpu", batch_size: int = 4096) -> None:
        super().__init__(probe=probe, W=W, b=b, Cs=Cs, seed=seed, device=device, batch_size=batch_size)
        self.dim = dim

    def fit(self, X: Any, y: Any = None) -> ViM:
        """Head, principal subspace (pass 1) and ``alpha`` (pass 2) from ``X``; returns ``self``."""
        X, _ = self._start_fit(X, y, need_y=False)
        d = X.shape[1]
        self.dim_ = default_vim_dim(d) if self.dim is None else int(self.dim)
        if not 0 <= self.dim_ < d:
            raise ProbeInputError(f"dim must be in [0, {d}) for {d} features, got {self.dim}")
        self._fit_head(X, y)
        rcond = max(self.W_.shape) * np.finfo(np.float32).eps  # a softmax head is rank C-1 up to float32 noise
        self.origin_ = -np.linalg.pinv(self.W_, rcond=rcond) @ self.b_
        self._b_centred = self.W_ @ self.origin_ + self.b_  # logits of x - u
        # The two passes over train run their products in float32 (twice float64's rate) and
        # sum per chunk into float64: the subspace and alpha move by ~1e-6, AUROC by far less.
        origin32 = self.origin_.astype(np.float32)
        gram, max_logit, residual = np.zeros((d, d)), 0.0, 0.0
        for chunk in iter_rows(X, self.batch_size, dtype=np.float32):
            chunk -= origin32
            max_logit += float((chunk @ self.W_.T.astype(np.float32) + self._b_centred).max(1).sum())
            gram += chunk.T @ chunk
        _, V = np.linalg.eigh(gram / X.shape[0])
        self.residual_basis_ = np.ascontiguousarray(V[:, : d - self.dim_])  # smallest eigenvalues
        self._principal = np.ascontiguousarray(V[:, d - self.dim_ :])
        for chunk in iter_rows(X, self.batch_size, dtype=np.float32):
            residual += float(self._residual(np.subtract(chunk, origin32, out=chunk), np.float32).sum())
        self.alpha_ = float(max_logit / residual) if residual > 0 else 0.0
        return self

    def _residual(self, centred: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
        """Norm of the part of ``x - u`` outside the principal subspace, by the thinner basis."""
        if self._principal.shape[1] >= self.residual_basis_.shape[1]:
            return np.linalg.norm((centred @ self.residual_basis_.astype(dtype)).astype(np.float64), axis=1)
        P = (centred @ self._principal.astype(dtype)).astype(np.float64)
        sq = row_sq(centred.astype(np.float64)) - row_sq(P)  # float64: the cancellation does no harm
        return np.sqrt(np.maximum(sq, 0.0))

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        chunk -= self.origin_  # chunks are fresh copies
        energy = softmax_parts(chunk @ self.W_.T + self._b_centred, 1.0)[1]
        return energy - self.alpha_ * self._residual(chunk)


# --------------------------------------------------------------------------- registry


SCORES: dict[str, Callable[..., _Scorer]] = {
    "msp": partial(LogitScorer, kind="msp"),
    "maxlogit": partial(LogitScorer, kind="maxlogit"),
    "energy": partial(LogitScorer, kind="energy"),
    "mahalanobis": Mahalanobis,
    "relative_mahalanobis": RelativeMahalanobis,
    "knn": KNNDistance,
    "vim": ViM,
    "cosine": CosineNearestMean,
}
"""Score name -> factory taking the scorer's keyword parameters (``SCORES["knn"](k=200)``)."""


def make_scorer(name: str, **params: Any) -> _Scorer:
    """The unfitted scorer called ``name`` in :data:`SCORES`, with ``params``."""
    if name not in SCORES:
        raise ProbeInputError(f"unknown OOD score {name!r}; choose one of {', '.join(SCORES)}")
    return SCORES[name](**params)
