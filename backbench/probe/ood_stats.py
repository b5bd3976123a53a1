"""The arithmetic behind the OOD scores of :mod:`backbench.probe.ood`: logit scores, linear
heads, streaming class moments and whitening, all in float64 over row chunks.

Kept apart from the scorers so each reads on its own: the scorers hold the scikit-learn
contract, these functions the numerics (see :func:`class_moments` and :func:`whitening` for
why the one-pass moments do not cancel and how the pseudo-inverse cuts off).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from backbench.errors import ProbeInputError
from backbench.probe.blocks import NOT_FINITE, iter_blocks
from backbench.probe.search import check_features

LOGIT_KINDS = ("msp", "maxlogit", "energy")
_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------- arrays


def iter_rows(X: Any, batch_size: int, dtype=np.float64, name: str = "X") -> Iterator[np.ndarray]:
    """Row chunks of ``X`` as fresh C-contiguous ``dtype`` arrays; NaN or inf raises."""
    message = NOT_FINITE.format(name=name, purpose="scoring")
    return (chunk for _, chunk in iter_blocks(X, batch_size, dtype=dtype, check_finite=message))


def softmax_parts(Z: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """``(max, logsumexp)`` of each row of ``Z / temperature``."""
    Z = Z / temperature
    top = Z.max(1)
    return top, top + np.log(np.exp(Z - top[:, None]).sum(1))


def logit_kind(Z: np.ndarray, kind: str, temperature: float) -> np.ndarray:
    if kind == "maxlogit":
        return Z.max(1)
    top, lse = softmax_parts(Z, temperature)
    return temperature * lse if kind == "energy" else np.exp(top - lse)


def check_kind(kind: str, temperature: float) -> None:
    if kind not in LOGIT_KINDS:
        raise ProbeInputError(f"kind must be one of {', '.join(LOGIT_KINDS)}; got {kind!r}")
    if not temperature > 0:
        raise ProbeInputError(f"temperature must be positive, got {temperature}")


def logit_scores(logits: Any, kind: str = "msp", *, temperature: float = 1.0, batch_size: int = 65536) -> np.ndarray:
    """ID scores from logits (n, n_classes): max softmax probability, max logit or ``T * logsumexp(z / T)``.

    For the backbone's own classifier logits, e.g. as stored in the cache; read in row chunks.
    """
    check_kind(kind, temperature)
    logits = check_features(logits, "logits")
    return np.concatenate([logit_kind(Z, kind, temperature) for Z in iter_rows(logits, batch_size, name="logits")])


def linear_head(probe: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` with ``logits = X @ W.T + b`` on raw features, from a fitted linear probe.

    A backbench :class:`LinearProbe` holds its weights in the standardized space; they are
    folded back. A binary scikit-learn model (one row of ``coef_``) gets a zero row first.
    """
    check_is_fitted(probe, "coef_")
    W = np.asarray(probe.coef_, dtype=np.float64)
    b = np.asarray(probe.intercept_, dtype=np.float64).reshape(-1)
    if hasattr(probe, "scale_") and hasattr(probe, "mean_"):
        W = W / probe.scale_
        b = b - W @ probe.mean_
    if W.shape[0] == 1:
        W, b = np.vstack([np.zeros_like(W), W]), np.concatenate([[0.0], b])
    return W, b


def default_vim_dim(d: int) -> int:
    """ViM's principal dimension as the paper sets it: 1000 from 1500 dims, 512 from 768, else d // 2.

    (The authors' benchmark script switches to 1000 at 2048 dims; no model they report lies between.)
    """
    return 1000 if d >= 1500 else 512 if d >= 768 else d // 2


# --------------------------------------------------------------------------- moments


def class_moments(X: Any, codes: np.ndarray, n_classes: int, batch_size: int, *, scatter: bool = True) -> dict:
    """One streaming float64 pass: ``counts``, class ``means``, and (``scatter``) the tied
    within-class covariance ``within`` and the total covariance ``total`` (both divided by n).
    """
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    shift, sums, gram, start = None, None, None, 0
    for chunk in iter_rows(X, batch_size):
        if shift is None:
            shift = chunk.mean(0)
            sums = np.zeros((n_classes, chunk.shape[1]))
            gram = np.zeros((chunk.shape[1],) * 2) if scatter else None
        chunk -= shift
        cc = codes[start : start + len(chunk)]
        start += len(chunk)
        order = np.argsort(cc, kind="stable")
        first = np.flatnonzero(np.r_[True, cc[order][1:] != cc[order][:-1]])
        sums[cc[order][first]] += np.add.reduceat(chunk[order], first, axis=0)
        if scatter:
            gram += chunk.T @ chunk
    n = counts.sum()
    out = {"counts": counts, "means": sums / counts[:, None] + shift}
    if scatter:
        total = sums.sum(0) / n
        out["within"] = (gram - sums.T @ (sums / counts[:, None])) / n
        out["total"] = gram / n - np.outer(total, total)
        out["mean"] = total + shift
    return out


def whitening(cov: np.ndarray) -> np.ndarray:
    """``A`` (d, rank) with ``A @ A.T == pinv(cov)``, so ``||(x - mu) @ A||^2`` is a Mahalanobis distance.

    A well-conditioned ``cov`` (reciprocal condition estimate above 1e-8, where the pinv cutoff
    drops nothing and pinv is the inverse) takes the inverse Cholesky factor; otherwise
    eigenvalues at or below ``d * eps * max`` are dropped (``scipy.linalg.pinvh``'s cutoff).
    """
    from scipy.linalg import lapack

    L, info = lapack.dpotrf(cov, lower=1, clean=1)
    if info == 0 and lapack.dpocon(L, np.abs(cov).sum(0).max(), uplo="L")[0] > 1e-8:
        inv_L, info = lapack.dtrtri(L, lower=1)
        if info == 0:
            return np.ascontiguousarray(inv_L.T)
    lam, V = np.linalg.eigh(cov)
    keep = lam > max(lam[-1], 0.0) * len(lam) * _EPS
    if not keep.any():
        raise ProbeInputError("the training features have zero variance; a Gaussian cannot be fitted to them")
    return V[:, keep] / np.sqrt(lam[keep])


def row_sq(Z: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", Z, Z)


def sq_dists(Z: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n, C) between rows of ``Z`` and of ``centers`` (float64)."""
    D = row_sq(Z)[:, None] - 2.0 * (Z @ centers.T) + row_sq(centers)
    return np.maximum(D, 0.0, out=D)
